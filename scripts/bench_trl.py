"""Run workload W1 in TRL's GRPOTrainer on the CPU and print seconds per GRPO step.

Run: python scripts/bench_trl.py [--threads 2] [--steps 6]
(needs `pip install torch transformers trl datasets accelerate`).

W1, as `configs/bench-w1.toml` describes it for sobre: a randomly initialised transformers
Qwen3-MoE with the `w1` preset's dimensions (vocab 512, hidden 256, 4 layers, 4 heads / 2 KV,
head_dim 64, 8 experts top-2, moe_intermediate 128, untied head); 8 prompts x 8 completions = 64
per step; exactly 64 new tokens each (eos disabled via min_new_tokens); temperature 1.0;
beta 0.04 (reference model on); one update per batch; loss "grpo"; prompts of 32 tokens.
The tokenizer is a throwaway word-level one over 512 ids, made in memory: the workload only
needs ids. Prints the median step time over the steps after the first (warm-up) as JSON.
"""
import argparse
import json
import statistics
import time

import torch
import transformers
import trl
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM, TrainerCallback
from trl import GRPOConfig, GRPOTrainer


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self.t = [], None

    def on_step_begin(self, args, state, control, **kw):
        self.t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self.t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    vocab = {f"w{i}": i for i in range(512)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="w1"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="w0", pad_token="w0", unk_token="w1")
    tok.chat_template = None

    cfg = Qwen3MoeConfig(vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                         num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, tie_word_embeddings=False,
                         eos_token_id=0, pad_token_id=0)
    # TRL builds the reference model from a path, so the random model is saved first.
    model_dir = "/tmp/bench_trl_w1"
    Qwen3MoeForCausalLM(cfg).float().save_pretrained(model_dir)
    tok.save_pretrained(model_dir)

    prompts = [" ".join(f"w{(p * 7919 + i * 104729 + 13) % 510 + 2}" for i in range(32)) for p in range(8)]
    ds = Dataset.from_dict({"prompt": prompts * (a.steps + 2)})

    def reward(completions, **kw):
        return [float(len(c) % 7) for c in completions]

    args = GRPOConfig(
        output_dir="/tmp/bench_trl", use_cpu=True, report_to=[], save_strategy="no", logging_steps=1000,
        per_device_train_batch_size=64, num_generations=8, max_completion_length=64, temperature=1.0,
        beta=0.04, num_iterations=1, loss_type="grpo", max_steps=a.steps, learning_rate=1e-5,
        generation_kwargs={"min_new_tokens": 64}, shuffle_dataset=False, bf16=False,
    )
    timer = StepTimer()
    trainer = GRPOTrainer(model=model_dir, reward_funcs=reward, args=args, train_dataset=ds,
                          processing_class=tok, callbacks=[timer])
    trainer.train()
    steps = timer.times[1:]
    print(json.dumps({"benchmark": "grpo_step_w1", "framework": "trl", "trl": trl.__version__,
                      "transformers": transformers.__version__, "torch": torch.__version__,
                      "threads": a.threads, "timed_steps": len(steps),
                      "median_step_s": statistics.median(steps), "steps_s": steps}))


if __name__ == "__main__":
    main()
