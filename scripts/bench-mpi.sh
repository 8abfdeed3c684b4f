#!/usr/bin/env bash
# The W1 GRPO step on 2 cores two ways, alternating within each round (docs/SCALE.md):
# one process with 2 replicas (threads) against `mpirun -np 2` with 1 replica per rank.
#   scripts/bench-mpi.sh [ROUNDS]        # default 3; needs a build with --features mpi
# SOBRE (default target/release/sobre-mpi) is the binary for both sides. Each side's figure is
# `sobre bench step`'s median over its timed steps; results go to target/bench/mpi.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
sobre="${SOBRE:-target/release/sobre-mpi}"
rounds="${1:-3}"
mkdir -p target/bench
results=target/bench/mpi.jsonl
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# step REPLICAS [LAUNCHER...]: one W1 bench step process (or job), its JSON report on stdout
step() {
  local replicas=$1; shift
  "$@" "$sobre" bench step --config configs/bench-w1.toml --gemm-size 0 --breakdown-reps 0 \
    --set "run.data_parallel_size=$replicas"
}
row() {
  python3 - "$1" "$2" "$results" <<'PY'
import json, sys
side, path, results = sys.argv[1], sys.argv[2], sys.argv[3]
d = json.load(open(path))
keys = ["median_step_s", "median_rollout_s", "median_reference_s", "median_policy_s",
        "peak_rss_mib", "ranks"]
r = {"side": side, **{k: d.get(k) for k in keys}}
open(results, "a").write(json.dumps(r) + "\n")
print(json.dumps(r))
PY
}
echo "{\"run\": \"mpi-w1\", \"date\": \"$(date -u +%FT%TZ)\", \"commit\": \"$(git rev-parse --short HEAD)\"}" >> "$results"
tmp=$(mktemp)
for i in $(seq 1 "$rounds"); do
  echo "round $i $(date +%H:%M:%S)" >&2
  step 2 > "$tmp"
  row "1 rank x 2 replicas" "$tmp"
  step 1 mpirun -np 2 > "$tmp"
  row "2 ranks x 1 replica" "$tmp"
done
rm -f "$tmp"
