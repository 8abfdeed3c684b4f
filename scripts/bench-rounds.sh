#!/usr/bin/env bash
# Same-run rounds of issue 9's W1 comparison: each round runs `sobre bench step` on W1 and then
# TRL's GRPOTrainer on the same workload (scripts/bench_trl.py), back to back, and prints both
# medians and their ratio; at the end the median ratio and how many rounds reached the target.
# Alternating keeps both sides under the same machine state (this 2-core VM's speed moves by
# 30–50% between runs a minute apart), which separate sets of runs would not.
#
#   scripts/bench-rounds.sh [ROUNDS] [SOBRE_BINARY]     # defaults: 10, target/release/sobre
#
# Needs a Python with torch, transformers and trl (PYTHON, default /opt/hfenv/bin/python; see
# the README's Results for the versions measured). Run nothing else meanwhile.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-10}"
sobre="${2:-target/release/sobre}"
python="${PYTHON:-/opt/hfenv/bin/python}"
target="${TARGET_RATIO:-3}"
config="${CONFIG:-configs/bench-w1.toml}"
median_of() { python3 -c 'import json,sys; print(json.load(sys.stdin)["median_step_s"])'; }
ratios=()
for i in $(seq 1 "$rounds"); do
  s=$("$sobre" bench step --config "$config" 2>/dev/null | median_of)
  t=$("$python" scripts/bench_trl.py 2>/dev/null | tail -1 | median_of)
  r=$(python3 -c "print(f'{$t / $s:.2f}')")
  ratios+=("$r")
  echo "round $i $(date +%H:%M:%S): sobre $s s, TRL $t s, TRL/sobre ${r}x"
done
python3 - "$target" "${ratios[@]}" <<'PY'
import statistics, sys
target, ratios = float(sys.argv[1]), [float(r) for r in sys.argv[2:]]
met = sum(r >= target for r in ratios)
print(f"median {statistics.median(ratios):.2f}x, min {min(ratios):.2f}x, max {max(ratios):.2f}x; "
      f"{met} of {len(ratios)} rounds >= {target:g}x")
PY
