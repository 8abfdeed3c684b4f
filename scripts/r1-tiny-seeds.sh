#!/usr/bin/env bash
# The demo's claim, for several training seeds: for each seed, the SFT-only control, then the
# R1 recipe (SFT → GRPO) whose end-of-run table evaluates the SFT checkpoint, the final
# checkpoint and that seed's control on the same 300 held-out problems (4 samples, T = 1).
#
#   scripts/r1-tiny-seeds.sh            # seeds 1 2 3 → runs/r1-tiny-seed{1,2,3}, docs/r1-tiny-seed*.png
#   scripts/r1-tiny-seeds.sh 4 5        # other seeds
#
# Each seed takes about twice the demo's wall time (the control gets the same time as the
# recipe). Prints each run's table, then one line per seed; the figures are in
# runs/r1-tiny-seed*/final_eval.json.
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=("$@")
[ ${#seeds[@]} -gt 0 ] || seeds=(1 2 3)
cargo build --release -p sobre-cli
sobre=target/release/sobre
for seed in "${seeds[@]}"; do
  control="runs/r1-tiny-sft-only-seed$seed"
  run="runs/r1-tiny-seed$seed"
  for d in "$control" "$run"; do
    if [ -e "$d" ]; then echo "$d exists: remove it or pick other seeds" >&2; exit 1; fi
  done
  "$sobre" train --config configs/r1-tiny-sft-only.toml --out "$control" --set run.seed="$seed"
  "$sobre" train --config configs/r1-tiny.toml --out "$run" --set run.seed="$seed" \
    --set "eval.compare.control=\"$control\""
  "$sobre" plot "$run" --out "docs/r1-tiny-seed$seed.png" \
    --title "r1-tiny, seed $seed: SFT on 1,000 demonstrations, then GRPO"
done
echo
echo "seed  sft  final  control  (held-out pass@1, %; runs/r1-tiny-seed*/final_eval.json)"
for seed in "${seeds[@]}"; do
  f="runs/r1-tiny-seed$seed/final_eval.json"
  # "pass@1" of each row, in the file's order (sft, final, control).
  vals=$(grep -o '"pass@1": [0-9.e-]*' "$f" | awk '{printf " %5.1f", 100 * $2}')
  echo "$seed   $vals"
done
