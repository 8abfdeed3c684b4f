#!/usr/bin/env python3
"""Check a run's TensorBoard event files against its metrics.jsonl.

    python scripts/check_tensorboard.py RUN_DIR

Loads RUN_DIR/tensorboard with TensorBoard's own reader
(tensorboard.backend.event_processing.event_accumulator.EventAccumulator) and checks that every
numeric scalar of every RUN_DIR/metrics.jsonl line is there as tag `<stage>/<key>` (`<key>`
without a stage) at the line's `step` (0 without one), equal within float32 precision
(relative 1e-6). The scalars are chosen as sobre's JsonlWriter chooses them: numbers, bools
as 0/1, one level of nested objects as `<key>/<inner>`; strings, nulls, arrays and the keys
`stage` and `step` are not written. Where a step was written twice (a resumed run redoes the
steps after its last checkpoint), the value written last is compared.

Exits 1 naming the tag and step of each mismatch (the first 20), prints the count of checked
scalars on success. Needs `pip install tensorboard` (scripts/check_tensorboard.sh makes a venv).
"""

import json
import math
import os
import sys


def scalar(v):
    if isinstance(v, bool):
        return 1.0 if v else 0.0
    if isinstance(v, (int, float)):
        return float(v)
    return None


def expected_scalars(obj):
    """(step, [(tag, value)]) of one metrics line, as JsonlWriter::write writes them."""
    step = obj.get("step")
    step = step if isinstance(step, int) and not isinstance(step, bool) else 0
    stage = obj.get("stage")
    prefix = f"{stage}/" if isinstance(stage, str) and stage else ""
    out = []
    for k, v in obj.items():
        if k in ("stage", "step"):
            continue
        x = scalar(v)
        if x is not None:
            out.append((prefix + k, x))
        elif isinstance(v, dict):
            for k2, v2 in v.items():
                x = scalar(v2)
                if x is not None:
                    out.append((f"{prefix}{k}/{k2}", x))
    return step, out


def close(got, want):
    if got == want:
        return True
    if math.isnan(got) or math.isnan(want):
        return False
    # float32 keeps ~7 digits; values below float32's range flush towards 0.
    return abs(got - want) <= 1e-6 * max(abs(got), abs(want)) or abs(got - want) <= 1e-37


def main(argv):
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    run_dir = argv[1]
    tb_dir = os.path.join(run_dir, "tensorboard")
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isdir(tb_dir):
        print(f"no TensorBoard directory {tb_dir}", file=sys.stderr)
        return 1
    files = [f for f in os.listdir(tb_dir) if "tfevents" in f]
    if not files:
        print(f"no event files in {tb_dir}", file=sys.stderr)
        return 1

    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(
        tb_dir, size_guidance={event_accumulator.SCALARS: 0}  # 0 = keep every event
    )
    acc.Reload()
    tb = {}  # tag -> {step: value written last}
    for tag in acc.Tags()["scalars"]:
        by_step = {}
        for e in acc.Scalars(tag):
            by_step[e.step] = e.value
        tb[tag] = by_step

    checked = 0
    errors = []
    with open(metrics) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            obj = json.loads(line)
            if not isinstance(obj, dict):
                continue
            step, scalars = expected_scalars(obj)
            for tag, want in scalars:
                checked += 1
                if tag not in tb:
                    errors.append(f"line {n}: tag {tag!r} missing from TensorBoard")
                elif step not in tb[tag]:
                    errors.append(f"line {n}: tag {tag!r} has no step {step}")
                elif not close(tb[tag][step], want):
                    errors.append(
                        f"line {n}: tag {tag!r} step {step}: TensorBoard {tb[tag][step]!r}, "
                        f"metrics.jsonl {want!r}"
                    )
    if errors:
        for e in errors[:20]:
            print(e, file=sys.stderr)
        if len(errors) > 20:
            print(f"... and {len(errors) - 20} more", file=sys.stderr)
        print(f"FAILED: {len(errors)} of {checked} scalars differ", file=sys.stderr)
        return 1
    if checked == 0:
        print(f"no numeric scalars in {metrics}", file=sys.stderr)
        return 1
    n_tb = sum(len(v) for v in tb.values())
    print(
        f"ok: {checked} scalars of {metrics} match {len(files)} event file(s) "
        f"({len(tb)} tags, {n_tb} tag/step points)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
