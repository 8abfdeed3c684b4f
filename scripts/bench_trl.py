"""Run workload W1 (or W3, W4) in TRL's GRPOTrainer on the CPU and print seconds per GRPO step
and the process's peak RSS.

Run: python scripts/bench_trl.py [--workload w1|w3|w4] [--new-tokens N] [--threads 2] [--steps 6]
(needs `pip install torch transformers trl datasets accelerate`).

W3 and W4 (issue 26) read the model directories scripts/make_bench_models.py writes
(`--models target/bench`), the same weights `configs/bench-w3.toml` and `configs/bench-w4.toml`
train: W3 8 prompts x 8 completions of 32 + 64 tokens (`--new-tokens 512`: the long variant),
W4 4 x 4 of 64 + 128. Their tokenizer is word-level over the whole vocabulary, so that every id
a completion samples decodes.

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
import os
import resource
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
    ap.add_argument("--workload", choices=["w1", "w3", "w4"], default="w1")
    ap.add_argument("--models", default="target/bench")
    ap.add_argument("--new-tokens", type=int)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    # (vocab, prompts, group, prompt tokens, new tokens)
    vocab_n, n_prompts, group, prompt_len, new = {
        "w1": (512, 8, 8, 32, 64), "w3": (32768, 8, 8, 32, 64), "w4": (151936, 4, 4, 64, 128)
    }[a.workload]
    new = a.new_tokens or new

    vocab = {f"w{i}": i for i in range(vocab_n)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="w1"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="w0", pad_token="w0", unk_token="w1")
    tok.chat_template = None

    if a.workload == "w1":
        cfg = Qwen3MoeConfig(vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                             num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, tie_word_embeddings=False,
                             eos_token_id=0, pad_token_id=0)
        # TRL builds the reference model from a path, so the random model is saved first.
        model_dir = "/tmp/bench_trl_w1"
        Qwen3MoeForCausalLM(cfg).float().save_pretrained(model_dir)
    else:
        model_dir = f"/tmp/bench_trl_{a.workload}"
        os.makedirs(model_dir, exist_ok=True)
        src = os.path.join(os.path.abspath(a.models), a.workload)
        for f in ["config.json", "model.safetensors", "generation_config.json"]:
            dst = os.path.join(model_dir, f)
            if not os.path.exists(dst):
                os.symlink(os.path.join(src, f), dst)
    tok.save_pretrained(model_dir)

    prompts = [" ".join(f"w{(p * 7919 + i * 104729 + 13) % 510 + 2}" for i in range(prompt_len))
               for p in range(n_prompts)]
    ds = Dataset.from_dict({"prompt": prompts * (a.steps + 2)})

    def reward(completions, **kw):
        return [float(len(c) % 7) for c in completions]

    args = GRPOConfig(
        output_dir="/tmp/bench_trl", use_cpu=True, report_to=[], save_strategy="no", logging_steps=1000,
        per_device_train_batch_size=n_prompts * group, num_generations=group, max_completion_length=new,
        temperature=1.0,
        beta=0.04, num_iterations=1, loss_type="grpo", max_steps=a.steps, learning_rate=1e-5,
        generation_kwargs={"min_new_tokens": new}, shuffle_dataset=False, bf16=False,
    )
    timer = StepTimer()
    trainer = GRPOTrainer(model=model_dir, reward_funcs=reward, args=args, train_dataset=ds,
                          processing_class=tok, callbacks=[timer])
    trainer.train()
    steps = timer.times[1:]
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"benchmark": f"grpo_step_{a.workload}", "framework": "trl", "new_tokens": new,
                      "peak_rss_mib": round(peak_rss_mib, 1), "trl": trl.__version__,
                      "transformers": transformers.__version__, "torch": torch.__version__,
                      "threads": a.threads, "timed_steps": len(steps),
                      "median_step_s": statistics.median(steps), "steps_s": steps}))


if __name__ == "__main__":
    main()
