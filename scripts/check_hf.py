"""Check that transformers loads a model directory sobre wrote and computes the same logits.

Run:  python scripts/check_hf.py DIR [--sobre target/release/sobre] [--ids 1,5,9] [--tol 1e-4]
      (needs `pip install torch transformers`)

It loads DIR with `AutoModelForCausalLM` (and `AutoTokenizer` when tokenizer files are there),
fails on any missing, unexpected or mis-shaped tensor, runs one fixed token sequence, runs
`sobre logits` on the same sequence, and prints the largest absolute difference over every
position and vocabulary entry. Exit status: 0 when it is at most --tol, 1 otherwise, 2 when
transformers or sobre could not load the directory.

sobre-only options (sigmoid scoring or DeepSeek routing on a qwen3_moe config, the
auxiliary-loss-free bias, `n_shared_experts`, ...) are kept in config.json as extra keys that
transformers' classes ignore: such a model is not representable in transformers, and the script
says so before comparing.
"""

import argparse
import json
import os
import subprocess
import sys

# Non-neutral values of these keys mean transformers computes something else than sobre.
SOBRE_ONLY = {
    "scoring_func": "softmax",
    "aux_loss_free_bias": False,
    "topk_method": "greedy",
    "n_shared_experts": 0,
    "first_k_dense_replace": 0,
    "moe_layer_freq": 1,
    "qk_norm": None,
    "shared_expert_gate": None,
}


def sobre_only_options(cfg):
    # DeepSeek's own classes read these keys: on deepseek_v2 / deepseek_v3 they are not sobre's.
    if cfg.get("model_type") in ("deepseek_v2", "deepseek_v3"):
        return []
    found = []
    for key, neutral in SOBRE_ONLY.items():
        if key in cfg and (neutral is None or cfg[key] != neutral):
            found.append(f"{key}={cfg[key]!r}")
    if cfg.get("routed_scaling_factor", 1.0) != 1.0 and cfg.get("model_type") != "deepseek_v3":
        found.append(f"routed_scaling_factor={cfg['routed_scaling_factor']!r}")
    if cfg.get("model_type") != "qwen2_moe" and cfg.get("shared_expert_intermediate_size", 0):
        found.append(f"shared_expert_intermediate_size={cfg['shared_expert_intermediate_size']!r}")
    return found


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--sobre", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "sobre"))
    ap.add_argument("--ids", default="1,5,9,33,77,2,100,64,3,18,91,45,7,120,11,60")
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with open(os.path.join(args.dir, "config.json")) as f:
        cfg = json.load(f)
    ids = [int(i) % cfg["vocab_size"] for i in args.ids.split(",")]
    extra = sobre_only_options(cfg)
    if extra:
        print("note: config.json uses sobre-only options that transformers ignores: " + ", ".join(extra))
        print("      transformers computes a different model; a mismatch below is expected.")

    try:
        model, info = AutoModelForCausalLM.from_pretrained(args.dir, dtype=torch.float32, output_loading_info=True)
    except Exception as e:  # noqa: BLE001 - report whatever transformers raised
        print(f"transformers could not load {args.dir}: {e}")
        return 2
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        print(f"transformers loaded {args.dir} with problems: {problems}")
        return 2
    print(f"transformers: {type(model).__name__} loaded, {sum(p.numel() for p in model.parameters())} parameters")
    if any(os.path.exists(os.path.join(args.dir, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        tok = AutoTokenizer.from_pretrained(args.dir)
        print(f"transformers: {type(tok).__name__} loaded, 'hello' -> {tok('hello')['input_ids']}")

    model.eval()
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits[0].float()

    run = subprocess.run([args.sobre, "logits", "--model", args.dir, "--ids", ",".join(map(str, ids))],
                         capture_output=True, text=True)
    if run.returncode != 0:
        print(f"sobre logits failed ({run.returncode}): {run.stderr.strip()}")
        return 2
    got = torch.tensor(json.loads(run.stdout)["logits"], dtype=torch.float32)
    if got.shape != want.shape:
        print(f"shape mismatch: sobre {tuple(got.shape)}, transformers {tuple(want.shape)}")
        return 1
    diff = (got - want).abs().max().item()
    ok = diff <= args.tol
    print(f"{args.dir}: {len(ids)} positions x {want.shape[-1]} logits, max |sobre - transformers| = {diff:.3e} "
          f"({'ok' if ok else 'FAIL'}, tolerance {args.tol:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
