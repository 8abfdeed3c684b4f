"""Make (and check) the PEFT LoRA fixture that sobre-model's `tests/peft.rs` compares against.

Needs `pip install torch transformers peft safetensors`.

  python scripts/make_peft_fixture.py
      Builds a LoRA adapter with PEFT on the committed `qwen2_tiny` fixture (r 4, lora_alpha 6,
      rsLoRA, all seven projections: q/k/v/o and the MLP's gate/up/down), gives A and B
      seeded non-zero random values (PEFT's own init leaves B at zero, which would test
      nothing), saves it with `save_pretrained` into
      crates/sobre-model/tests/fixtures/qwen2_tiny_lora/, and records PEFT's logits on the
      base fixture's token sequences in `reference.json` there.

  python scripts/make_peft_fixture.py --check DIR
      Loads an adapter directory sobre wrote (DIR, with `sobre_logits.json` beside the
      adapter, as `tests/peft.rs` writes it when SOBRE_PEFT_OUT=DIR is set) onto the
      `qwen2_tiny` base with `PeftModel.from_pretrained`, runs the same sequences and prints
      the max |logit difference| to sobre's; exit 1 above --tol (1e-4). It also checks the
      merged model (`merge_and_unload`) gives the same logits.
"""

import argparse
import json
import os
import sys

import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "crates", "sobre-model", "tests", "fixtures")
BASE = os.path.join(FIXTURES, "qwen2_tiny")
OUT = os.path.join(FIXTURES, "qwen2_tiny_lora")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def sequences():
    with open(os.path.join(BASE, "reference.json")) as f:
        return [c["ids"] for c in json.load(f)["cases"]]


def logits_of(model, seqs):
    out = []
    with torch.no_grad():
        for ids in seqs:
            x = torch.tensor([ids])
            out.append(model(input_ids=x).logits[0].tolist())
    return out


def max_diff(a, b):
    return max(abs(x - y) for ra, rb in zip(a, b) for xa, xb in zip(ra, rb) for x, y in zip(xa, xb))


def make():
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    base.eval()
    cfg = LoraConfig(
        r=4,
        lora_alpha=6,
        lora_dropout=0.0,
        target_modules=TARGETS,
        use_rslora=True,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    model.eval()
    seqs = sequences()
    ref = logits_of(model, seqs)
    os.makedirs(OUT, exist_ok=True)
    model.save_pretrained(OUT)
    # The base as sobre finds it: relative to the adapter directory (PEFT reads this key only
    # when no base model is passed in; `--check` passes one).
    path = os.path.join(OUT, "adapter_config.json")
    with open(path) as f:
        c = json.load(f)
    c["base_model_name_or_path"] = "../qwen2_tiny"
    with open(path, "w") as f:
        json.dump(c, f, indent=2, sort_keys=True)
        f.write("\n")
    readme = os.path.join(OUT, "README.md")
    if os.path.exists(readme):
        os.remove(readme)
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump(
            {
                "peft": peft.__version__,
                "transformers": transformers.__version__,
                "torch": torch.__version__,
                "base": "qwen2_tiny",
                "cases": [{"ids": s, "logits": l} for s, l in zip(seqs, ref)],
            },
            f,
        )
    with torch.no_grad():
        with model.disable_adapter():
            plain = logits_of(model, seqs)
    print(f"wrote {OUT}: adapter moves the logits by up to {max_diff(ref, plain):.3g}")


def check(d, tol):
    with open(os.path.join(d, "sobre_logits.json")) as f:
        sobre = json.load(f)
    seqs = [c["ids"] for c in sobre["cases"]]
    want = [c["logits"] for c in sobre["cases"]]
    base = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, d)
    model.eval()
    got = logits_of(model, seqs)
    diff = max_diff(got, want)
    merged = model.merge_and_unload()
    diff_merged = max_diff(logits_of(merged, seqs), want)
    print(
        f"peft {peft.__version__} loads sobre's adapter in {d}: max |logit - sobre| = {diff:.3g} "
        f"(merged: {diff_merged:.3g}; tolerance {tol:g})"
    )
    return 0 if max(diff, diff_merged) <= tol else 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", metavar="DIR")
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()
    if args.check:
        sys.exit(check(args.check, args.tol))
    make()


if __name__ == "__main__":
    main()
