"""Make the tiny Hugging Face reference checkpoints that sobre-model's tests compare against.

Run: python scripts/make_hf_fixtures.py [NAME ...]   (needs `pip install torch transformers safetensors`)
With no NAME it makes every fixture; with names (the fixture directories, e.g. `qwen2_tiny llama_tiny`,
or `chat` for qwen3_moe_chat_tiny) only those.

For each family it builds a tiny random model with transformers, saves it with
`save_pretrained` (so the files are exactly what transformers writes), and records the logits
it computes for a few token sequences, plus greedy `generate` continuations, in
`reference.json`. Weights are drawn with a larger spread than HF's init so that logits and
routing decisions are far from uniform: a wrong router or RoPE shows up as a large error.
"""

import json
import math
import os
import subprocess
import sys
import tempfile

import torch
import transformers
from transformers import (
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    GraniteMoeConfig,
    GraniteMoeForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "sobre-model", "tests", "fixtures")


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)


def record(model, cfg, sequences, name, extra_config=None, shard=None, drop_config=(), aux=True):
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    kwargs = {"safe_serialization": True}
    if shard:
        kwargs["max_shard_size"] = shard
    model.save_pretrained(d, **kwargs)
    if extra_config:
        with open(os.path.join(d, "config.json")) as f:
            c = json.load(f)
        c.update(extra_config)
        for k in drop_config:
            c.pop(k, None)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(c, f, indent=2)
    cases = []
    model.eval()
    with torch.no_grad():
        for ids in sequences:
            x = torch.tensor([ids])
            out = model(input_ids=x, output_router_logits=aux)
            logits = out.logits[0]
            gen = model.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False,
                eos_token_id=None, pad_token_id=0,
            )[0, len(ids):].tolist()
            cases.append({"ids": ids, "logits": [[round(v, 6) for v in row] for row in logits.tolist()],
                          "greedy": gen, "aux_loss": float(out.aux_loss) if aux else None})
    ref = {"transformers": transformers.__version__, "torch": torch.__version__, "cases": cases}
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump(ref, f)
    print(name, sum(p.numel() for p in model.parameters()), "params")


def fnv1a64(data):
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def export_fixture(seqs):
    """The export check: sobre writes the `tiny` preset (seed 7, initializer_range 0.5) with the
    `write_model` example, transformers loads it, and reference.json records what transformers
    loaded (config.json, each tensor's FNV-1a hash) and computed (logits, greedy). No weights are
    committed: the Rust test (tests/export_fixture.rs) writes the same directory again and checks
    it against this record."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    root = os.path.join(os.path.dirname(__file__), "..")
    with tempfile.TemporaryDirectory() as tmp:
        d = os.path.join(tmp, "m")
        subprocess.run(["cargo", "run", "-q", "--release", "-p", "sobre-model", "--example", "write_model", "--",
                        "preset", "tiny", "7", "0.5", d], check=True, cwd=root)
        model, info = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, output_loading_info=True)
        bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        assert not bad, f"transformers did not load sobre's files cleanly: {bad}"
        with open(os.path.join(d, "config.json")) as f:
            config = json.load(f)
        tensors = {}
        with safe_open(os.path.join(d, "model.safetensors"), "np") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                tensors[name] = {"shape": list(t.shape), "dtype": str(t.dtype), "fnv1a64": fnv1a64(t.tobytes())}
        # What transformers holds is what the file holds: writing it back gives the same tensors.
        again = os.path.join(tmp, "again")
        model.save_pretrained(again)
        with safe_open(os.path.join(again, "model.safetensors"), "np") as f:
            assert sorted(f.keys()) == sorted(tensors), "transformers re-saved other tensor names"
            for name in f.keys():
                assert fnv1a64(f.get_tensor(name).tobytes()) == tensors[name]["fnv1a64"], name
        vocab = config["vocab_size"]
        cases = []
        model.eval()
        with torch.no_grad():
            for ids in seqs:
                ids = [i % vocab for i in ids]
                x = torch.tensor([ids])
                logits = model(input_ids=x).logits[0]
                gen = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
                cases.append({"ids": ids, "logits": [[round(v, 6) for v in row] for row in logits.tolist()],
                              "greedy": gen})
    out = os.path.join(OUT, "sobre_export_tiny")
    os.makedirs(out, exist_ok=True)
    ref = {"transformers": transformers.__version__, "torch": torch.__version__,
           "written_by": "write_model preset tiny 7 0.5", "architecture": type(model).__name__,
           "config": config, "tensors": tensors, "cases": cases}
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump(ref, f, indent=None)
    print("sobre_export_tiny", len(tensors), "tensors")


def chat_fixture():
    """A stand-in for a real HF chat model (configs/from-hf.toml and its tests start from it): a
    byte-level BPE that `sobre tokenizer train` trained on datasets/countdown/train.jsonl (vocab
    320), extended as Qwen's is with the special tokens `<|im_start|>` / `<|im_end|>` (the eos) and
    the real Qwen2.5 chat template (sobre-data's fixture); a tiny random Qwen3-MoE whose vocabulary
    is the tokenizer's size; a generation_config.json with Qwen-style eos ids and sampling
    defaults. All of it written by transformers' `save_pretrained`. reference.json records the
    chat rendering of one countdown prompt by `apply_chat_template`, its ids, and the logits
    transformers computes at a few positions (the Rust test in sobre-train's data.rs checks that
    sobre renders the same text, encodes the same ids and computes the same logits).

    SOBRE_BIN names the sobre binary to train the tokenizer with (default: cargo run --release)."""
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    root = os.path.join(os.path.dirname(__file__), "..")
    name = "qwen3_moe_chat_tiny"
    d = os.path.join(OUT, name)
    with open(os.path.join(root, "crates", "sobre-data", "tests", "fixtures", "chat", "qwen2.5.json")) as f:
        template = json.load(f)["chat_template"]
    with open(os.path.join(root, "datasets", "countdown", "train.jsonl")) as f:
        prompt = json.loads(f.readline())["prompt"]
    sobre = os.environ.get("SOBRE_BIN")
    cmd = [sobre] if sobre else ["cargo", "run", "-q", "--release", "-p", "sobre-cli", "--bin", "sobre", "--"]
    with tempfile.TemporaryDirectory() as tmp:
        tk = os.path.join(tmp, "tk")
        subprocess.run(cmd + ["tokenizer", "train", "--data", "datasets/countdown/train.jsonl", "--vocab-size", "320",
                              "--template", "plain", "--out", tk], check=True, cwd=root, stdout=subprocess.DEVNULL)
        tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(tk, "tokenizer.json"), eos_token="<|im_end|>",
                                      pad_token="<|endoftext|>", bos_token=None, unk_token=None,
                                      model_max_length=2048, clean_up_tokenization_spaces=False)
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tok.chat_template = template
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    endoftext = tok.convert_tokens_to_ids("<|endoftext|>")
    cfg = Qwen3MoeConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
                         mlp_only_layers=[], rms_norm_eps=1e-6, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                         max_position_embeddings=1024, bos_token_id=endoftext, eos_token_id=im_end,
                         pad_token_id=endoftext)
    model = Qwen3MoeForCausalLM(cfg).float()
    randomize(model, 8)
    model.tie_weights()
    model.generation_config = GenerationConfig(bos_token_id=endoftext, eos_token_id=[im_end, endoftext],
                                               pad_token_id=endoftext, do_sample=True, temperature=0.8,
                                               top_p=0.95, top_k=20)
    os.makedirs(d, exist_ok=True)
    for f in os.listdir(d):
        os.remove(os.path.join(d, f))
    model.save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    # Hub models such as Qwen2.5 carry the template inside tokenizer_config.json; transformers 5
    # writes it to chat_template.jinja instead. Keep the hub layout (transformers reads both).
    jinja = os.path.join(d, "chat_template.jinja")
    if os.path.exists(jinja):
        os.remove(jinja)
    with open(os.path.join(d, "tokenizer_config.json")) as f:
        tc = json.load(f)
    tc["chat_template"] = template
    # transformers 5 names its own class; 4.x and other readers know PreTrainedTokenizerFast.
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump(tc, f, indent=2, ensure_ascii=False)
        f.write("\n")

    # Reload what was written, as a user of the directory would.
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    assert tok.chat_template == template
    messages = [{"role": "user", "content": prompt}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    templated = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if hasattr(templated, "keys"):
        templated = templated["input_ids"]
    assert list(templated) == ids, "apply_chat_template ids differ from encoding its text"
    n = len(ids)
    positions = sorted({0, 1, n // 3, n // 2, n - 2, n - 1})
    model.eval()
    with torch.no_grad():
        x = torch.tensor([ids])
        logits = model(input_ids=x).logits[0]
        greedy = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False,
                                eos_token_id=None, pad_token_id=endoftext)[0, n:].tolist()
    ref = {"transformers": transformers.__version__, "torch": torch.__version__, "prompt": prompt,
           "rendered": text, "ids": ids, "eos_token_id": [im_end, endoftext], "pad_token_id": endoftext,
           "vocab_size": len(tok), "positions": positions,
           "logits": [[round(v, 6) for v in logits[p].tolist()] for p in positions], "greedy": greedy}
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump(ref, f)
    print(name, sum(p.numel() for p in model.parameters()), "params,", len(tok), "tokens,", n, "prompt tokens")


FIXTURES = ["qwen3_moe_tiny", "qwen2_moe_tiny", "mixtral_tiny", "olmoe_tiny", "deepseek_v3_routing_tiny",
            "deepseek_v2_routing_tiny", "qwen2_tiny", "qwen2_yarn_tiny", "qwen3_tiny", "llama_tiny",
            "llama_linear_tiny", "mistral_tiny", "granitemoe_tiny", "deepseek_v2_lite_tiny", "deepseek_v3_tiny",
            "sobre_export_tiny", "qwen3_moe_chat_tiny"]


def wavelengths(model, name):
    """Print each RoPE frequency's wavelength (positions per turn) before and after the model's
    scaling, and the cos/sin factor, so that a scaled fixture can be seen to reach every band of its
    rope type. Returns the unscaled wavelengths."""
    rope = model.model.rotary_emb
    inv = rope.inv_freq.double()
    dim = 2 * inv.numel()
    base = model.config.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    before, after = (2 * math.pi * base).tolist(), (2 * math.pi / inv).tolist()
    print(name, "wavelengths", " ".join(f"{b:.1f}->{a:.1f}" for b, a in zip(before, after)),
          "cos/sin factor", rope.attention_scaling)
    return before


def main():
    names = ["qwen3_moe_chat_tiny" if a == "chat" else a for a in sys.argv[1:]]
    unknown = [n for n in names if n not in FIXTURES]
    if unknown:
        sys.exit(f"unknown fixture {' '.join(unknown)}; known: chat {' '.join(FIXTURES)}")

    def wanted(name):
        return not names or name in names

    torch.manual_seed(0)
    seqs = [[1, 5, 9, 33, 77, 2, 100, 64, 3, 18, 91, 45, 7, 120, 11, 60],
            [127, 0, 42, 42, 42, 8],
            [17]]
    # Longer than the scaled fixtures' original context (16, or 32 for llama3), and than Qwen2's
    # unused sliding window.
    long = [(7 * i * i + 13 * i + 5) % 128 for i in range(40)]

    # Qwen3-MoE: explicit head_dim != hidden/heads, q/k norm, one dense layer via mlp_only_layers,
    # renormalised top-k, untied head.
    if wanted("qwen3_moe_tiny"):
        c3 = Qwen3MoeConfig(vocab_size=128, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            num_experts=6, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1],
                            decoder_sparse_step=1, rms_norm_eps=1e-6, tie_word_embeddings=False,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                            max_position_embeddings=256)
        m3 = Qwen3MoeForCausalLM(c3).float()
        randomize(m3, 1)
        record(m3, c3, seqs, "qwen3_moe_tiny")

    # Qwen2-MoE: qkv bias, shared expert with sigmoid gate, sparse every 2nd layer, no top-k
    # renormalisation, tied embeddings, sharded safetensors.
    if wanted("qwen2_moe_tiny"):
        c2 = Qwen2MoeConfig(vocab_size=128, hidden_size=32, intermediate_size=40, moe_intermediate_size=12,
                            shared_expert_intermediate_size=24, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=1, num_experts=5, num_experts_per_tok=3, norm_topk_prob=False,
                            decoder_sparse_step=2, mlp_only_layers=[], rms_norm_eps=1e-5,
                            tie_word_embeddings=True,
                            rope_parameters={"rope_type": "default", "rope_theta": 500.0},
                            max_position_embeddings=256)
        m2 = Qwen2MoeForCausalLM(c2).float()
        randomize(m2, 2)
        m2.tie_weights()
        record(m2, c2, seqs, "qwen2_moe_tiny", shard="60KB")

    # Mixtral: block_sparse_moe / w1 w3 w2 names, always-renormalised softmax top-k, no q/k norm,
    # no biases, experts as wide as `intermediate_size`, sliding_window null.
    if wanted("mixtral_tiny"):
        cm = MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=20, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=5,
                           num_experts_per_tok=2, rms_norm_eps=1e-5, sliding_window=None,
                           tie_word_embeddings=False, router_jitter_noise=0.0,
                           rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
                           max_position_embeddings=256)
        mm = MixtralForCausalLM(cm).float()
        randomize(mm, 3)
        record(mm, cm, seqs, "mixtral_tiny")

    # OLMoE: q/k RMSNorm over the whole projection (k_norm over num_kv_heads·head_dim), clip_qkv
    # small enough that the clamp bites, softmax top-k without renormalisation, GQA.
    if wanted("olmoe_tiny"):
        co = OlmoeConfig(vocab_size=128, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_experts=6, num_experts_per_tok=3,
                         norm_topk_prob=False, clip_qkv=1.5, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                         max_position_embeddings=256, pad_token_id=None, eos_token_id=None)
        mo = OlmoeForCausalLM(co).float()
        randomize(mo, 4)
        record(mo, co, seqs, "olmoe_tiny")

    # DeepSeek routing. Every DeepSeek-V2/V3 config uses Multi-head Latent Attention, which sobre
    # does not compute, so the routing is tested on a Qwen3-MoE model whose sparse blocks are
    # transformers' own DeepseekV3MoE / DeepseekV2Moe modules; config.json then carries sobre's
    # keys for the DeepSeek routing options. transformers' DeepSeek classes compute no aux loss.
    for name, seed, moe_cls, ds_cfg, keys in [
        ("deepseek_v3_routing_tiny", 5, DeepseekV3MoE,
         DeepseekV3Config(hidden_size=32, n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2,
                          moe_intermediate_size=12, n_shared_experts=2, routed_scaling_factor=2.5,
                          norm_topk_prob=True, intermediate_size=40),
         {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "n_group": 4, "topk_group": 2,
          "n_shared_experts": 2, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
          "aux_loss_free_bias": True, "first_k_dense_replace": 1}),
        ("deepseek_v2_routing_tiny", 6, DeepseekV2Moe,
         DeepseekV2Config(hidden_size=32, n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2,
                          topk_method="group_limited_greedy", moe_intermediate_size=12, n_shared_experts=1,
                          routed_scaling_factor=1.5, intermediate_size=40),
         {"scoring_func": "softmax", "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
          "n_shared_experts": 1, "routed_scaling_factor": 1.5, "norm_topk_prob": False,
          "first_k_dense_replace": 1}),
    ]:
        if not wanted(name):
            continue
        cq = Qwen3MoeConfig(vocab_size=128, hidden_size=32, intermediate_size=40, moe_intermediate_size=12,
                            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            num_experts=8, num_experts_per_tok=3, norm_topk_prob=keys["norm_topk_prob"],
                            mlp_only_layers=[0], decoder_sparse_step=1, rms_norm_eps=1e-6,
                            tie_word_embeddings=False,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                            max_position_embeddings=256)
        mq = Qwen3MoeForCausalLM(cq).float()
        for layer in mq.model.layers[1:]:
            layer.mlp = moe_cls(ds_cfg).float()
        randomize(mq, seed)
        g = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for layer in mq.model.layers[1:]:
                if hasattr(layer.mlp.gate, "e_score_correction_bias"):
                    layer.mlp.gate.e_score_correction_bias.copy_(0.2 * torch.randn(8, generator=g))
        record(mq, cq, seqs, name, extra_config=keys, drop_config=("mlp_only_layers",), aux=False)

    # Qwen2: q/k/v bias, untied head. Hub Qwen2 configs carry a `sliding_window` value beside
    # use_sliding_window=false; transformers writes null there, so config.json gets the value back.
    # The window (8, from layer max_window_layers=1 on) is shorter than the 40-token case, so a
    # reader that applied it would be caught.
    if wanted("qwen2_tiny"):
        c = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                        tie_word_embeddings=False, use_sliding_window=False, sliding_window=8,
                        max_window_layers=1, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                        max_position_embeddings=256)
        m = Qwen2ForCausalLM(c).float()
        randomize(m, 11)
        record(m, c, seqs + [long], "qwen2_tiny", extra_config={"sliding_window": 8}, aux=False)

    # Qwen2 with YaRN: factor 4 over an original context of 16 (the 40-token case runs past it);
    # theta 20 puts the ramp's ends at dims 0 and 2 of head_dim 8, so one frequency is kept, one
    # blended half-way and two interpolated; cos/sin scaled by 0.1·ln 4 + 1. Tied embeddings.
    if wanted("qwen2_yarn_tiny"):
        c = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                        tie_word_embeddings=True,
                        rope_parameters={"rope_type": "yarn", "rope_theta": 20.0, "factor": 4.0,
                                         "original_max_position_embeddings": 16},
                        max_position_embeddings=64)
        m = Qwen2ForCausalLM(c).float()
        randomize(m, 12)
        m.tie_weights()
        wavelengths(m, "qwen2_yarn_tiny")
        record(m, c, seqs + [long], "qwen2_yarn_tiny", aux=False)

    # Qwen3 (dense): per-head q/k RMSNorm, head_dim 16 != hidden/heads, q/k/v bias, tied embeddings.
    if wanted("qwen3_tiny"):
        c = Qwen3Config(vocab_size=128, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_bias=True,
                        rms_norm_eps=1e-6, tie_word_embeddings=True,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                        max_position_embeddings=256)
        m = Qwen3ForCausalLM(c).float()
        randomize(m, 13)
        m.tie_weights()
        record(m, c, seqs, "qwen3_tiny", aux=False)

    # Llama 3.1 RoPE (factor 8, low/high_freq_factor 1/4). The shortest wavelength is 2π whatever
    # theta, so the high-frequency band (wavelength < original/high_freq_factor) needs an original
    # context above 8π: 32. head_dim 16 and theta 500 give wavelengths 6.3 (kept), 13.6 and 29.6
    # (smoothed), 64 and up (divided by 8). Tied embeddings, eos a list as Llama 3's.
    if wanted("llama_tiny"):
        c = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                        tie_word_embeddings=True, bos_token_id=0, eos_token_id=[1, 2],
                        rope_parameters={"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 32},
                        max_position_embeddings=256)
        m = LlamaForCausalLM(c).float()
        randomize(m, 14)
        m.tie_weights()
        w = wavelengths(m, "llama_tiny")
        orig = 32
        assert min(w) < orig / 4 and max(w) > orig and any(orig / 4 <= x <= orig for x in w), w
        record(m, c, seqs + [long], "llama_tiny", aux=False)

    # Llama with linear RoPE scaling (positions / 2), biases on q/k/v/o and on the MLP, untied head.
    if wanted("llama_linear_tiny"):
        c = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, attention_bias=True,
                        mlp_bias=True, tie_word_embeddings=False,
                        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
                        max_position_embeddings=256)
        m = LlamaForCausalLM(c).float()
        randomize(m, 15)
        wavelengths(m, "llama_linear_tiny")
        record(m, c, seqs + [long], "llama_linear_tiny", aux=False)

    # Mistral: Llama's layout without biases, sliding_window null, untied head.
    if wanted("mistral_tiny"):
        c = MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, sliding_window=None,
                          tie_word_embeddings=False,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                          max_position_embeddings=256)
        m = MistralForCausalLM(c).float()
        randomize(m, 16)
        record(m, c, seqs, "mistral_tiny", aux=False)

    # GraniteMoE: fused expert tensors (input_linear = gate|up, output_linear), router.layer, softmax
    # top-2 renormalised, and Granite's four multipliers: embeddings ×12, attention scores ×0.1 (in
    # place of 1/√head_dim), each residual branch ×0.3, logits ÷4. Untied: with the ×12 the embedding
    # would swamp the residual branches and a tied head would predict its input token, so, as in a
    # trained Granite, the embedding table is small (÷6 here) and the head is ×4.
    if wanted("granitemoe_tiny"):
        c = GraniteMoeConfig(vocab_size=128, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                             num_experts_per_tok=2, rms_norm_eps=1e-6, tie_word_embeddings=False,
                             embedding_multiplier=12.0, attention_multiplier=0.1, residual_multiplier=0.3,
                             logits_scaling=4.0, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                             max_position_embeddings=256)
        m = GraniteMoeForCausalLM(c).float()
        randomize(m, 17)
        with torch.no_grad():
            m.model.embed_tokens.weight.div_(6.0)
            m.lm_head.weight.mul_(4.0)
        record(m, c, seqs, "granitemoe_tiny")

    # DeepSeek-V2-Lite layout: MLA with a plain q_proj (q_lora_rank null), compressed kv (rank 16)
    # plus one shared 8-dim rope key, v_head_dim 12 != qk head dim 16; layer 0 dense, layer 1 MoE
    # (softmax greedy top-2 of 4, no renormalisation, ×1.5, one shared expert). YaRN (factor 4,
    # original 16, theta 5: ramp 0..3, so two of the four frequencies blended) with mscale =
    # mscale_all_dim, so cos/sin stay unscaled and the softmax scale gains (0.1·0.707·ln 4 + 1)².
    # Complex (interleaved) rope on q_pe/k_pe.
    if wanted("deepseek_v2_lite_tiny"):
        c = DeepseekV2Config(vocab_size=128, hidden_size=32, intermediate_size=40, moe_intermediate_size=12,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None,
                             kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
                             n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                             topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
                             routed_scaling_factor=1.5, rms_norm_eps=1e-6, tie_word_embeddings=False,
                             rope_parameters={"rope_type": "yarn", "rope_theta": 5.0, "factor": 4.0,
                                              "original_max_position_embeddings": 16, "mscale": 0.707,
                                              "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1},
                             max_position_embeddings=64)
        m = DeepseekV2ForCausalLM(c).float()
        randomize(m, 18)
        wavelengths(m, "deepseek_v2_lite_tiny")
        record(m, c, seqs + [long], "deepseek_v2_lite_tiny", aux=False)

    # DeepSeek-V3 layout: MLA with low-rank q (q_a_proj → q_a_layernorm → q_b_proj, rank 16), kv rank
    # 16, qk 8+8, v 8, interleaved rope (rope_interleave); layer 0 dense, layer 1 MoE with sigmoid
    # noaux_tc routing (2 groups of 2, best group kept, top-2, renormalised, ×2.5, a random
    # e_score_correction_bias), one shared expert; YaRN as above with theta 20 (one frequency
    # blended). No multi-token-prediction layer.
    if wanted("deepseek_v3_tiny"):
        c = DeepseekV3Config(vocab_size=128, hidden_size=32, intermediate_size=40, moe_intermediate_size=12,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16,
                             kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                             n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                             n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5,
                             rope_interleave=True, num_mtp_layers=0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                             rope_parameters={"rope_type": "yarn", "rope_theta": 20.0, "factor": 4.0,
                                              "original_max_position_embeddings": 16, "mscale": 0.707,
                                              "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1},
                             max_position_embeddings=64)
        m = DeepseekV3ForCausalLM(c).float()
        randomize(m, 19)
        g = torch.Generator().manual_seed(119)
        with torch.no_grad():
            m.model.layers[1].mlp.gate.e_score_correction_bias.copy_(0.2 * torch.randn(4, generator=g))
        wavelengths(m, "deepseek_v3_tiny")
        record(m, c, seqs + [long], "deepseek_v3_tiny", aux=False)

    if wanted("sobre_export_tiny"):
        export_fixture(seqs)
    if wanted("qwen3_moe_chat_tiny"):
        chat_fixture()


if __name__ == "__main__":
    sys.exit(main())
