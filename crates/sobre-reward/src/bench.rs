//! Deterministic, realistic completions for measuring reward throughput (`sobre bench rewards`).
//!
//! Each is an R1-format completion of about 500 characters: a `<think>` block of arithmetic
//! reasoning, then an answer written as a bare `<answer>` value or as `\boxed{…}` inside it, half
//! of them correct. Gold answers mix integers, thousands separators, fractions and decimals.

use crate::Sample;
use serde_json::Value;

/// A tiny deterministic generator (SplitMix64), so the set is the same on every machine.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

const STEPS: &[&str] = &[
    "First, I add the two amounts: {a} + {b} = {s}.",
    "Then I multiply by the number of days, {a} * {b} = {p}.",
    "Let me double-check by subtracting: {s} - {b} = {a}, which matches.",
    "So the remaining quantity is {s} minus what was used.",
    "Wait, I should consider whether the question asks for the total or the difference.",
    "Dividing {p} by {b} gives back {a}, so the product is right.",
    "The problem says each box holds {a} items and there are {b} boxes.",
];

/// `n` (sample, completion) pairs from `seed`.
pub fn realistic_completions(n: usize, seed: u64) -> Vec<(Sample, String)> {
    let mut rng = SplitMix(seed);
    (0..n)
        .map(|_| {
            let a = 2 + rng.below(500);
            let b = 2 + rng.below(60);
            let (gold, right, wrong) = match rng.below(4) {
                0 => {
                    let v = a * b;
                    (
                        v.to_string(),
                        v.to_string(),
                        (v + 1 + rng.below(9)).to_string(),
                    )
                }
                1 => {
                    let v = a * b * 37;
                    let sep = if v >= 1000 {
                        format!("{},{:03}", v / 1000, v % 1000)
                    } else {
                        v.to_string()
                    };
                    (v.to_string(), sep, (v * 2).to_string())
                }
                2 => (
                    format!("\\frac{{{a}}}{{{b}}}"),
                    format!("\\dfrac{{{}}}{{{}}}", a * 2, b * 2),
                    format!("{b}/{a}"),
                ),
                _ => {
                    let v = a as f64 / 4.0;
                    (
                        format!("{v}"),
                        format!("\\frac{{{a}}}{{4}}"),
                        format!("{:.1}", v + 0.5),
                    )
                }
            };
            let pred = if rng.below(2) == 0 { right } else { wrong };
            let mut think = String::new();
            while think.len() < 380 {
                let step = STEPS[rng.below(STEPS.len() as u64) as usize];
                let step = step
                    .replace("{a}", &a.to_string())
                    .replace("{b}", &b.to_string())
                    .replace("{s}", &(a + b).to_string())
                    .replace("{p}", &(a * b).to_string());
                think.push_str(&step);
                think.push(' ');
            }
            let answer = if rng.below(2) == 0 {
                format!("The answer is $\\boxed{{{pred}}}$.")
            } else {
                pred
            };
            let text = format!(
                "<think>\n{}\n</think>\n<answer>\n{answer}\n</answer>",
                think.trim_end()
            );
            let mut sample = Sample::new();
            sample.insert("answer".into(), Value::String(gold));
            (sample, text)
        })
        .collect()
}

/// Executions per second of the `code` reward's programs, measured in one run: a small Python
/// program (read two numbers, print their sum) run one at a time in the sandbox and as a plain
/// subprocess without limits, then a GRPO-sized batch (64 completions, one test each) through
/// the `code` reward with its default concurrency. `Err` (a reason) where Python or the sandbox
/// is missing.
pub fn code_executions(budget: std::time::Duration) -> Result<Value, String> {
    use crate::sandbox::{Isolation, Limits, Sandbox, resolve_program, run_plain};
    use std::time::Instant;
    let python = resolve_program("python3").ok_or("python3 not found")?;
    let argv = vec![python.display().to_string(), "main.py".to_string()];
    let program: &[u8] = b"a, b = map(int, input().split())\nprint(a + b)\n";
    let files = [("main.py", program)];
    let sandbox =
        Sandbox::new(Limits::default(), Isolation::default()).map_err(|e| e.to_string())?;
    let per_sec = |run: &dyn Fn() -> Result<bool, String>| -> Result<(f64, u64), String> {
        run()?; // warm-up (and the sandbox probe)
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < budget || n == 0 {
            if !run()? {
                return Err("the benchmark program failed".into());
            }
            n += 1;
        }
        Ok((n as f64 / start.elapsed().as_secs_f64(), n))
    };
    let (sandboxed, n_sandboxed) = per_sec(&|| {
        let o = sandbox
            .run(&argv, &files, b"2 3\n")
            .map_err(|e| e.to_string())?;
        Ok(o.success() && o.stdout == b"5\n")
    })?;
    let (plain, n_plain) = per_sec(&|| {
        let o = run_plain(&argv, &files, b"2 3\n", std::time::Duration::from_secs(10))
            .map_err(|e| e.to_string())?;
        Ok(o.success() && o.stdout == b"5\n")
    })?;
    let reward = crate::code::CodeReward::new(Default::default()).map_err(|e| e.to_string())?;
    let mut sample = Sample::new();
    sample.insert(
        "input_output".into(),
        serde_json::json!({"inputs": ["2 3\n"], "outputs": ["5\n"]}),
    );
    let text = "```python\na, b = map(int, input().split())\nprint(a + b)\n```";
    let items: Vec<(&Sample, crate::Completion<'_>)> = (0..64)
        .map(|_| (&sample, crate::Completion::new(text)))
        .collect();
    let start = Instant::now();
    let mut batches = 0u64;
    while start.elapsed() < budget || batches == 0 {
        let scores = reward.score_many(&items);
        if scores.iter().any(|s| *s != Some(1.0)) {
            return Err(format!("a correct completion scored {scores:?}"));
        }
        batches += 1;
    }
    let batch_s = start.elapsed().as_secs_f64() / batches as f64;
    let round = |x: f64| (x * 10.0).round() / 10.0;
    Ok(serde_json::json!({
        "program": "python3: a, b = map(int, input().split()); print(a + b)",
        "sandbox": sandbox.steps(),
        "support": sandbox.support(),
        "sandboxed_execs_per_sec": round(sandboxed),
        "sandboxed_runs": n_sandboxed,
        "plain_execs_per_sec": round(plain),
        "plain_runs": n_plain,
        "sandbox_overhead_ms": round((1.0 / sandboxed - 1.0 / plain) * 1000.0),
        "ratio_to_plain": (sandboxed / plain * 1000.0).round() / 1000.0,
        "batch_of_64_seconds": (batch_s * 1000.0).round() / 1000.0,
        "batch_completions_per_sec": round(64.0 / batch_s),
        "batch_concurrency": std::thread::available_parallelism().map_or(1, |n| n.get()),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_about_500_chars() {
        let a = realistic_completions(50, 7);
        assert_eq!(a, realistic_completions(50, 7));
        let mean = a.iter().map(|(_, t)| t.len()).sum::<usize>() / a.len();
        assert!((420..=600).contains(&mean), "{mean}");
    }
}
