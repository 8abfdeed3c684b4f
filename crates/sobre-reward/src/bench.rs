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
