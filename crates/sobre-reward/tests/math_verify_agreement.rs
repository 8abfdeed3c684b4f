//! Agreement of the `accuracy` reward with the `math-verify` Python package.
//!
//! `data/math_verify_cases.jsonl` holds (gold, prediction, expected) rows labelled by
//! `scripts/label_math_verify.py`, which calls `verify(parse("$" + gold + "$"),
//! parse("The final answer is $\\boxed{" + prediction + "}$."))`. This test scores that same
//! completion text against `answer = gold`, prints the agreement and every disagreement, and
//! requires at least 97%.

use sobre_reward::accuracy::AccuracyReward;
use sobre_reward::{Completion, Reward, Sample};

#[test]
fn agreement_with_math_verify() {
    let data = include_str!("data/math_verify_cases.jsonl");
    let reward = AccuracyReward::default();
    let (mut n, mut agree) = (0usize, 0usize);
    let mut disagreements = Vec::new();
    for (i, line) in data
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let row: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("line {}: {e}", i + 1));
        let gold = row["gold"]
            .as_str()
            .unwrap_or_else(|| panic!("line {}: no gold", i + 1));
        let pred = row["prediction"]
            .as_str()
            .unwrap_or_else(|| panic!("line {}: no prediction", i + 1));
        let expected = row["expected"]
            .as_bool()
            .unwrap_or_else(|| panic!("line {}: no expected", i + 1));
        let mut sample = Sample::new();
        sample.insert("answer".into(), gold.into());
        let text = format!("The final answer is $\\boxed{{{pred}}}$.");
        let got = reward.score(&sample, &Completion::new(&text)) == Some(1.0);
        n += 1;
        if got == expected {
            agree += 1;
        } else {
            disagreements.push(format!(
                "  line {:>3}: gold {gold:?} pred {pred:?}: math-verify {expected}, ours {got}",
                i + 1
            ));
        }
    }
    let rate = agree as f64 / n as f64;
    println!("math-verify agreement: {agree}/{n} = {:.1}%", 100.0 * rate);
    for d in &disagreements {
        println!("{d}");
    }
    assert!(n >= 200, "only {n} cases");
    assert!(
        rate >= 0.97,
        "agreement {:.1}% < 97%:\n{}",
        100.0 * rate,
        disagreements.join("\n")
    );
}
