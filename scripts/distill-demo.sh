#!/usr/bin/env bash
# R1's distillation in miniature (README "Distillation"): the demo's model teaches a smaller
# one, against that smaller model's own SFT + GRPO given the same wall time.
#
#   scripts/distill-demo.sh [SEED]        # default 1; SOBRE=path/to/sobre to use another binary
#
# 1. The teacher: configs/r1-tiny.toml (1.42 M parameters), trained unless TEACHER names a run.
# 2. Distillation, timed: `sobre generate` samples 4 completions per GRPO prompt from the
#    teacher and keeps the shortest correct one, then configs/r1-tiny-distill.toml trains the
#    0.37 M student on those traces by SFT alone.
# 3. The baseline: configs/r1-tiny-student.toml (the same student, SFT on the 1,000
#    demonstrations then GRPO, r1-tiny's recipe) stopped with Ctrl-C (SIGINT: it saves a
#    checkpoint and exits) when it has run as long as step 2 took.
# 4. Both students and the teacher evaluated the same way: `sobre eval` on r1-tiny's 300
#    held-out problems, 4 samples at temperature 1.
# The teacher's own training is not counted in step 2's time (R1's distilled models did not pay
# for R1 either); its cost is printed next to the table. Prints the table and writes
# runs/distill-seed$SEED/summary.json.
set -euo pipefail
cd "$(dirname "$0")/.."
seed="${1:-1}"
sobre="${SOBRE:-target/release/sobre}"
[ -n "${SOBRE:-}" ] || cargo build --release -p sobre-cli
out="runs/distill-seed$seed"
teacher="${TEACHER:-$out/teacher}"
mkdir -p "$out"
if [ ! -f "$teacher/final_eval.json" ]; then
  "$sobre" train --config configs/r1-tiny.toml --out "$teacher" --set run.seed="$seed"
fi
now() { date +%s.%N; }
t0=$(now)
"$sobre" generate --model "$teacher" --config configs/r1-tiny.toml --set run.seed="$seed" \
  -n 4 --keep correct --k 1 --shortest --out "$out/traces.jsonl"
t1=$(now)
"$sobre" train --config configs/r1-tiny-distill.toml --out "$out/distilled" \
  --set run.seed="$seed" --set "data.sft_dataset.path=\"$out/traces.jsonl\""
t2=$(now)
budget=$(python3 -c "print(round($t2 - $t0))")
echo "distillation took $budget s (generate $(python3 -c "print(round($t1 - $t0))") s); the baseline gets as long"
t3=$(now)
# SIGINT at the budget: the run saves its checkpoint and exits 0 (130 if the signal raced exit).
timeout -s INT "$budget" "$sobre" train --config configs/r1-tiny-student.toml \
  --out "$out/student" --set run.seed="$seed" || true
t4=$(now)
evaluate() {
  "$sobre" eval --model "$1" --config configs/r1-tiny.toml --set run.seed="$seed" \
    --n 300 --samples 4 --temperature 1 --json > "$2"
}
evaluate "$teacher" "$out/eval-teacher.json"
evaluate "$out/distilled" "$out/eval-distilled.json"
evaluate "$out/student" "$out/eval-student.json"
python3 - "$out" "$budget" "$(python3 -c "print(round($t4 - $t3))")" <<'PY'
import json, pathlib, sys
out, budget, baseline_s = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def ev(name):
    return json.loads((out / f"eval-{name}.json").read_text().strip().splitlines()[-1])
def state(run):
    ck = sorted((out / run / "checkpoints").glob("*/trainer_state.json"))
    return json.loads(ck[-1].read_text()) if ck else {}
traces = sum(1 for _ in open(out / "traces.jsonl"))
st = state("student")
rows = {
    "teacher (r1-tiny, 1.42 M)": ev("teacher"),
    f"distilled student (SFT on {traces} teacher traces, {budget} s)": ev("distilled"),
    f"student's own SFT + GRPO ({st.get('step', 0)} GRPO steps, {baseline_s} s)": ev("student"),
}
w = max(len(k) for k in rows)
print(f"\n{'model':<{w}}  pass@1  pass@4")
for k, r in rows.items():
    print(f"{k:<{w}}  {100 * r['pass@1']:5.1f}%  {100 * r['pass@k']:5.1f}%")
summary = {"budget_s": budget, "baseline_s": baseline_s, "traces": traces,
           "student_grpo_steps": st.get("step", 0),
           "rows": {k: {"pass@1": r["pass@1"], "pass@k": r["pass@k"]} for k, r in rows.items()}}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
PY
