#!/usr/bin/env bash
# Every family's checkpoint written by sobre loads in transformers' AutoModelForCausalLM and
# gives sobre's logits: for each tiny transformers fixture, 2 SFT + 2 GRPO steps with sobre
# (a character-level tokenizer, as crates/sobre-train/tests/families.rs), then
# scripts/check_hf.py on the final checkpoint (model, tokenizer, logits within 1e-4).
#
#   scripts/check_hf_families.sh [PYTHON]      # PYTHON with torch + transformers
#                                              # (default target/hf-venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
py="${1:-target/hf-venv/bin/python}"
cargo build -q -p sobre-cli --bin sobre
sobre=target/debug/sobre
work=target/hf-families
rm -rf "$work" && mkdir -p "$work/tokenizer"
"$py" - "$work/tokenizer" <<'PY'
import json, sys
d = sys.argv[1]
vocab = {"<|endoftext|>": 0}
for i, c in enumerate(["\n"] + [chr(b) for b in range(32, 127)]):
    vocab[c] = i + 1
tok = {"version": "1.0", "truncation": None, "padding": None,
       "added_tokens": [{"id": 0, "content": "<|endoftext|>", "single_word": False, "lstrip": False,
                         "rstrip": False, "normalized": False, "special": True}],
       "normalizer": None, "pre_tokenizer": None, "post_processor": None, "decoder": {"type": "Fuse"},
       "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                 "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                 "ignore_merges": False, "vocab": vocab, "merges": []}}
json.dump(tok, open(f"{d}/tokenizer.json", "w"))
json.dump({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "model_max_length": 512,
           "tokenizer_class": "PreTrainedTokenizerFast"}, open(f"{d}/tokenizer_config.json", "w"))
PY
# The smoke config without its preset (the model comes from `[model] path`).
grep -v '^preset = ' configs/smoke.toml > "$work/base.toml"
status=0
for name in ${FAMILIES:-qwen2_tiny qwen2_yarn_tiny qwen3_tiny llama_tiny mistral_tiny granitemoe_tiny deepseek_v2_lite_tiny deepseek_v3_tiny}; do
  out="$work/$name"
  "$sobre" train --config "$work/base.toml" --out "$out" --quiet \
    --set model.path="\"crates/sobre-model/tests/fixtures/$name\"" \
    --set tokenizer.path="\"$work/tokenizer\"" --set run.steps=2 --set eval.at_end=false \
    --set grpo.num_prompts=2 --set rollout.max_new_tokens=12 >/dev/null
  "$py" scripts/check_hf.py "$out/checkpoints/step-000002" --sobre "$sobre" || status=1
done
exit $status
