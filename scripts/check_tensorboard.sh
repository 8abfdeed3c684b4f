#!/usr/bin/env bash
# TensorBoard event files against metrics.jsonl, read by TensorBoard's own reader.
#
#   scripts/check_tensorboard.sh            # smoke run (stopped and resumed) → target/tb-check, check it
#   scripts/check_tensorboard.sh RUN_DIR    # check an existing run directory only
#
# Makes a venv with tensorboard in target/tb-venv (once), then runs
# scripts/check_tensorboard.py: every numeric scalar of every metrics.jsonl line must be in
# RUN_DIR/tensorboard/ as <stage>/<key> at its step, equal within float32 precision.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/tb-venv
if ! "$venv/bin/python" -c "import tensorboard" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check tensorboard
fi
if [ $# -ge 1 ]; then
  run="$1"
else
  run=target/tb-check
  rm -rf "$run"
  sobre=(cargo run --release --quiet -p sobre-cli --bin sobre --)
  # Two GRPO steps, stop (checkpoint), resume for the third: two event files in one run.
  "${sobre[@]}" train --config configs/smoke.toml --out "$run" --quiet \
    --set run.steps=3 --set run.tensorboard=true --stop-after 2
  "${sobre[@]}" train --config configs/smoke.toml --out "$run" --quiet \
    --set run.steps=3 --set run.tensorboard=true --resume
fi
"$venv/bin/python" scripts/check_tensorboard.py "$run"
