"""Write the random-init model directories of the real-size workloads W3 and W4 (issue 26) with
transformers, so that sobre (`configs/bench-w3*.toml`, `configs/bench-w4.toml`) and TRL
(`scripts/bench_trl.py --workload w3|w4`) train the very same weights.

Run: python scripts/make_bench_models.py [--out target/bench]      (seed 0; rerun = same bytes)
(needs `pip install torch transformers`; scripts/bench-real-sizes.sh runs it when needed).

- W3 (`OUT/w3`): Qwen3-MoE, vocab 32,768, hidden 512, 8 layers, 8 heads / 4 KV heads, head_dim
  64, 16 experts top-4, moe_intermediate 256, untied head: 90 M parameters, 38 M active per token.
- W4 (`OUT/w4`): dense Qwen2 of Qwen2.5-0.5B's shape, vocab 151,936, hidden 896, 24 layers, 14
  heads / 2 KV heads, intermediate 4,864, tied embeddings, q/k/v biases: 494 M parameters.

Only config.json and model.safetensors are written: the tokenizers differ by side (sobre's
bench trains a byte-level BPE, TRL's script a word-level one over the whole vocabulary), which
changes which ids a prompt has, not the shapes or the arithmetic of a step.
"""
import argparse
import os

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM


def w3():
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(
        vocab_size=32768, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
        num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
        num_experts=16, num_experts_per_tok=4, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], tie_word_embeddings=False, max_position_embeddings=4096,
        eos_token_id=0, pad_token_id=0, bos_token_id=0))


def w4():
    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
        max_position_embeddings=4096, rope_theta=1000000.0, rms_norm_eps=1e-6,
        eos_token_id=0, pad_token_id=0, bos_token_id=0))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="target/bench")
    ap.add_argument("--only", choices=["w3", "w4"])
    a = ap.parse_args()
    for name, build in [("w3", w3), ("w4", w4)]:
        if a.only and a.only != name:
            continue
        path = os.path.join(a.out, name)
        if os.path.exists(os.path.join(path, "model.safetensors")):
            print(f"{path}: exists")
            continue
        torch.manual_seed(0)
        model = build().float()
        n = sum(p.numel() for p in model.parameters())
        model.save_pretrained(path)
        print(f"{path}: {n / 1e6:.1f} M parameters")


if __name__ == "__main__":
    main()
