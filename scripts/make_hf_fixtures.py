"""Make the tiny Hugging Face reference checkpoints that sobre-model's tests compare against.

Run: python scripts/make_hf_fixtures.py   (needs `pip install torch transformers safetensors`)

For each family it builds a tiny random model with transformers, saves it with
`save_pretrained` (so the files are exactly what transformers writes), and records the logits
it computes for a few token sequences, plus greedy `generate` continuations, in
`reference.json`. Weights are drawn with a larger spread than HF's init so that logits and
routing decisions are far from uniform: a wrong router or RoPE shows up as a large error.
"""

import json
import os
import sys

import torch
import transformers
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

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


def record(model, cfg, sequences, name, extra_config=None, shard=None):
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
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(c, f, indent=2)
    cases = []
    model.eval()
    with torch.no_grad():
        for ids in sequences:
            x = torch.tensor([ids])
            out = model(input_ids=x, output_router_logits=True)
            logits = out.logits[0]
            gen = model.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False,
                eos_token_id=None, pad_token_id=0,
            )[0, len(ids):].tolist()
            cases.append({"ids": ids, "logits": [[round(v, 6) for v in row] for row in logits.tolist()],
                          "greedy": gen, "aux_loss": float(out.aux_loss)})
    ref = {"transformers": transformers.__version__, "torch": torch.__version__, "cases": cases}
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump(ref, f)
    print(name, sum(p.numel() for p in model.parameters()), "params")


def main():
    torch.manual_seed(0)
    seqs = [[1, 5, 9, 33, 77, 2, 100, 64, 3, 18, 91, 45, 7, 120, 11, 60],
            [127, 0, 42, 42, 42, 8],
            [17]]

    # Qwen3-MoE: explicit head_dim != hidden/heads, q/k norm, one dense layer via mlp_only_layers,
    # renormalised top-k, untied head.
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


if __name__ == "__main__":
    sys.exit(main())
