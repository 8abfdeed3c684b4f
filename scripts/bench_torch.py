"""Time the W1 policy forward+backward in PyTorch eager, for comparison with sobre.

Run: python scripts/bench_torch.py [--threads 2] [--batch 64] [--seq 96]
(needs `pip install torch transformers`). Builds a transformers Qwen3-MoE with the dimensions of
sobre's `w1` preset (vocab 512, hidden 256, 4 layers, 4 heads / 2 KV heads, head_dim 64, 8 experts
top-2, moe_intermediate 128, untied head), runs `mean(logits)` forward + backward on a
[batch, seq] batch, and prints the median seconds as JSON.
"""
import argparse
import json
import statistics
import time

import torch
import transformers
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=96)
    ap.add_argument("--iters", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                         num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, tie_word_embeddings=False)
    model = Qwen3MoeForCausalLM(cfg).float().train()
    ids = torch.tensor([[(r * 31 + i * 7) % 512 for i in range(a.seq)] for r in range(a.batch)])
    fwd, total = [], []
    for it in range(a.iters + 1):
        model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        loss = model(input_ids=ids).logits.mean()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        if it > 0:  # the first iteration is warm-up
            fwd.append(t1 - t)
            total.append(t2 - t)
    print(json.dumps({"benchmark": "policy_forward_backward", "framework": "pytorch-eager",
                      "torch": torch.__version__, "transformers": transformers.__version__,
                      "threads": a.threads, "batch": a.batch, "seq": a.seq,
                      "forward_s": statistics.median(fwd), "forward_backward_s": statistics.median(total)}))


if __name__ == "__main__":
    main()
