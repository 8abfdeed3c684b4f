#!/usr/bin/env bash
# R1's four stages against the two-stage demo, same seeds, same evaluation (README "Results"):
# for each seed, configs/r1-tiny.toml (cold-start SFT → GRPO) then configs/r1-tiny-full.toml
# (cold-start SFT → reasoning RL → rejection sampling → SFT → RL again, the same settings),
# alternating so both see the same machine state; each ends with its held-out table (300
# problems, 4 samples at T = 1) in RUN/final_eval.json.
#
#   scripts/r1-tiny-full-seeds.sh            # seeds 1 2 3 → runs/r1-tiny{,-full}-seed{1,2,3}
#   SOBRE=path/to/sobre scripts/r1-tiny-full-seeds.sh 4 5
#
# Each seed takes about twice the demo's wall time. Prints one line per seed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=("$@")
[ ${#seeds[@]} -gt 0 ] || seeds=(1 2 3)
sobre="${SOBRE:-target/release/sobre}"
[ -n "${SOBRE:-}" ] || cargo build --release -p sobre-cli
for seed in "${seeds[@]}"; do
  for c in r1-tiny r1-tiny-full; do
    out="runs/$c-seed$seed"
    if [ -e "$out" ]; then echo "$out exists: remove it or pick other seeds" >&2; exit 1; fi
    "$sobre" train --config "configs/$c.toml" --out "$out" --set run.seed="$seed"
  done
done
echo
echo "held-out pass@1 (%): r1-tiny sft → final | r1-tiny-full per stage"
for seed in "${seeds[@]}"; do
  python3 - "$seed" <<'PY'
import json, sys
seed = sys.argv[1]
def rows(run):
    d = json.load(open(f"runs/{run}-seed{seed}/final_eval.json"))
    return " → ".join(f"{r['label']} {100 * r['report']['pass@1']:.1f}"
                      for r in d["rows"] if r.get("report"))
print(f"seed {seed}: {rows('r1-tiny')} | {rows('r1-tiny-full')}")
PY
done
