#!/usr/bin/env bash
# Issue 26's real-size comparison with TRL, in one run, alternating sides within each round:
#
#   scripts/bench-real-sizes.sh w3 [ROUNDS]     # W3: sobre (f32 reference), sobre (bf16
#                                               # reference), sobre (bf16 reference and
#                                               # gradient checkpointing), TRL; ROUNDS times
#                                               # (default 3)
#   scripts/bench-real-sizes.sh w3-long         # W3's peak RSS at 64, 128, 256, 512 new tokens,
#                                               # and at 512 with gradient checkpointing
#   scripts/bench-real-sizes.sh w4 [ROUNDS]     # W4: sobre (bf16 reference; and with gradient
#                                               # checkpointing), TRL (default 1)
#   scripts/bench-real-sizes.sh lora [ROUNDS]   # W3 and W4: full fine-tune vs LoRA r = 16
#                                               # (issue 27; default 1)
#
# Each side is its own process under /usr/bin/time -v, whose "Maximum resident set size" is
# the peak RSS both sides are compared by; step times are each side's own median over its
# timed steps (the first step of each process is warm-up). Results go to
# target/bench/results.jsonl (one line per process) and a table to stdout.
#
# Needs a Python with torch, transformers and trl (PYTHON, default /opt/hfenv/bin/python;
# scripts/bench_trl.py says which) and a release build (SOBRE, default target/release/sobre).
# Makes what it needs under target/bench the first time: the model directories
# (scripts/make_bench_models.py, ~2.4 GB) and sobre's tokenizer. Run nothing else meanwhile.
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-w3}"
python="${PYTHON:-/opt/hfenv/bin/python}"
sobre="${SOBRE:-target/release/sobre}"
out=target/bench
results="$out/results.jsonl"
mkdir -p "$out"

"$python" scripts/make_bench_models.py --out "$out" >&2
if [ ! -f "$out/tokenizer/tokenizer.json" ]; then
  "$sobre" data countdown --n 500 --seed 1 --demos --out "$out/demos.jsonl" >&2
  "$sobre" tokenizer train --data "$out/demos.jsonl" --vocab-size 512 --out "$out/tokenizer" >&2
fi

# peak RSS (MiB) from /usr/bin/time -v's report in file $1
peak_of() { awk '/Maximum resident set size/ {printf "%.0f", $NF / 1024}' "$1"; }

# run_sobre LABEL CONFIG STEPS [--set ...]: one process, its median step and peak RSS
run_sobre() {
  local label=$1 config=$2 steps=$3; shift 3
  local log; log=$(mktemp)
  /usr/bin/time -v "$sobre" bench step --config "$config" --warmup "${WARMUP:-1}" --steps "$steps" \
    --breakdown-reps 0 "$@" > "$log.json" 2> "$log"
  python3 - "$label" "$log.json" "$(peak_of "$log")" "$results" <<'PY'
import json, sys
label, path, peak, results = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
d = json.load(open(path))
row = {"side": label, "median_step_s": d["median_step_s"], "steps_s": d["steps_s"],
       "peak_rss_mib": peak, "rollout_s": d["median_rollout_s"],
       "reference_s": d["median_reference_s"], "policy_s": d["median_policy_s"],
       "new_tokens": d["workload"]["max_new_tokens"], "overrides": d["overrides"],
       "gflops": d.get("gflops")}
open(results, "a").write(json.dumps(row) + "\n")
print(json.dumps(row))
PY
  rm -f "$log" "$log.json"
}

# run_trl LABEL WORKLOAD STEPS [args]: TRL's GRPOTrainer on the same model directory
run_trl() {
  local label=$1 workload=$2 steps=$3; shift 3
  local log; log=$(mktemp)
  /usr/bin/time -v "$python" scripts/bench_trl.py --workload "$workload" --models "$out" \
    --steps "$steps" "$@" > "$log.json" 2> "$log" || { tail -5 "$log" >&2; return 1; }
  python3 - "$label" "$log.json" "$(peak_of "$log")" "$results" <<'PY'
import json, sys
label, path, peak, results = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
d = json.loads(open(path).read().strip().splitlines()[-1])
row = {"side": label, "median_step_s": d["median_step_s"], "steps_s": d["steps_s"],
       "peak_rss_mib": peak, "new_tokens": d["new_tokens"], "trl": d["trl"], "torch": d["torch"]}
open(results, "a").write(json.dumps(row) + "\n")
print(json.dumps(row))
PY
  rm -f "$log" "$log.json"
}

echo "{\"run\": \"$what\", \"date\": \"$(date -u +%FT%TZ)\", \"commit\": \"$(git rev-parse --short HEAD)\"}" >> "$results"
case "$what" in
  w3)
    for i in $(seq 1 "${2:-3}"); do
      echo "round $i $(date +%H:%M:%S)" >&2
      run_sobre sobre-w3 configs/bench-w3.toml 3
      run_sobre sobre-w3-bf16 configs/bench-w3.toml 3 --set 'model.frozen_dtype="bf16"'
      run_sobre sobre-w3-bf16-ckpt configs/bench-w3.toml 3 --set 'model.frozen_dtype="bf16"' \
        --set grpo.gradient_checkpointing=true
      run_trl trl-w3 w3 4
    done ;;
  w3-long)
    # one warm-up step, so that AdamW's moments exist, as in every later step
    for n in 64 128 256 512; do
      run_sobre "sobre-w3-$n" configs/bench-w3.toml 1 \
        --set "rollout.max_new_tokens=$n" --set 'model.frozen_dtype="bf16"'
    done
    run_sobre "sobre-w3-512-ckpt" configs/bench-w3.toml 1 --set "rollout.max_new_tokens=512" \
      --set 'model.frozen_dtype="bf16"' --set grpo.gradient_checkpointing=true ;;
  w4)
    for i in $(seq 1 "${2:-1}"); do
      echo "round $i $(date +%H:%M:%S)" >&2
      run_sobre sobre-w4-bf16 configs/bench-w4.toml 2 --prompt-tokens 64 \
        --set 'model.frozen_dtype="bf16"'
      run_sobre sobre-w4-bf16-ckpt configs/bench-w4.toml 2 --prompt-tokens 64 \
        --set 'model.frozen_dtype="bf16"' --set grpo.gradient_checkpointing=true
      run_trl trl-w4 w4 3
    done ;;
  lora)
    # Issue 27: full fine-tune against LoRA r = 16 (alpha 32) on the same workload, alternating.
    # W3's only linear modules outside the routed experts are attention's (LoRA on routed
    # experts is not supported); W4's adapters cover attention and the MLP.
    w3_lora=(--set lora.r=16 --set lora.alpha=32
      --set 'lora.target_modules=["q_proj","k_proj","v_proj","o_proj"]')
    w4_lora=(--set lora.r=16 --set lora.alpha=32
      --set 'lora.target_modules=["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"]')
    for i in $(seq 1 "${2:-1}"); do
      echo "round $i $(date +%H:%M:%S)" >&2
      run_sobre sobre-w3-full configs/bench-w3.toml 3 --set 'model.frozen_dtype="bf16"'
      run_sobre sobre-w3-lora16 configs/bench-w3.toml 3 "${w3_lora[@]}"
      run_sobre sobre-w3-lora16-bf16 configs/bench-w3.toml 3 "${w3_lora[@]}" \
        --set 'lora.base_dtype="bf16"'
      run_sobre sobre-w4-full configs/bench-w4.toml 1 --prompt-tokens 64 \
        --set 'model.frozen_dtype="bf16"'
      run_sobre sobre-w4-lora16 configs/bench-w4.toml 1 --prompt-tokens 64 "${w4_lora[@]}"
      run_sobre sobre-w4-lora16-bf16 configs/bench-w4.toml 1 --prompt-tokens 64 \
        "${w4_lora[@]}" --set 'lora.base_dtype="bf16"'
      # Both with gradient checkpointing: the policy update's activations are most of what
      # LoRA leaves (5 GB of W4's 8 GB peak).
      run_sobre sobre-w4-full-ckpt configs/bench-w4.toml 1 --prompt-tokens 64 \
        --set 'model.frozen_dtype="bf16"' --set grpo.gradient_checkpointing=true
      run_sobre sobre-w4-lora16-bf16-ckpt configs/bench-w4.toml 1 --prompt-tokens 64 \
        "${w4_lora[@]}" --set 'lora.base_dtype="bf16"' --set grpo.gradient_checkpointing=true
    done ;;
  *) echo "usage: $0 w3|w3-long|w4|lora [ROUNDS]" >&2; exit 2 ;;
esac
