//! Rewards never panic and finish in bounded time on any string: arbitrary text, adversarial
//! generators (deep nesting, huge exponents and integers, tags split mid-way), 1 MB inputs.

use proptest::prelude::*;
use sobre_reward::{CombinedReward, Completion, Sample};
use std::time::{Duration, Instant};

/// Every registered reward with default parameters (regex_match needs a pattern).
fn all_rewards() -> CombinedReward {
    CombinedReward::from_toml(
        r#"
        [[reward]]
        name = "accuracy"
        [[reward]]
        name = "format"
        [[reward]]
        name = "format"
        mode = "lenient"
        [[reward]]
        name = "tag_count"
        [[reward]]
        name = "countdown"
        [[reward]]
        name = "exact_match"
        [[reward]]
        name = "regex_match"
        pattern = "\\d+"
        [[reward]]
        name = "length"
        [[reward]]
        name = "overlong"
        [[reward]]
        name = "repetition"
        [[reward]]
        name = "language_consistency"
        [[reward]]
        name = "language_consistency"
        script = "han"
        "#,
    )
    .expect("valid config")
}

fn samples() -> Vec<Sample> {
    let rows = [
        r#"{"answer": "42", "nums": [1, 2, 3], "target": 6}"#,
        r#"{"answer": "\\frac{1}{2}"}"#,
        r#"{"answer": "(1, 2)", "nums": [99999999999, 7], "target": 3}"#,
        r#"{"answer": "x^2+1"}"#,
    ];
    rows.iter()
        .map(|r| serde_json::from_str(r).expect("valid json"))
        .collect()
}

fn score_all(text: &str) {
    let rewards = all_rewards();
    for s in samples() {
        let b = rewards.score(&s, &Completion::new(text));
        assert!(b.total.is_finite(), "non-finite total for {text:?}");
    }
}

/// Strings built from the pieces rewards look for, so random inputs hit the parsers' corners.
fn adversarial() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("<think>".to_string()),
        Just("</think>".to_string()),
        Just("<answer>".to_string()),
        Just("</answer>".to_string()),
        Just("<ans".to_string()),
        Just("\\boxed{".to_string()),
        Just("\\frac".to_string()),
        Just("\\sqrt[".to_string()),
        Just("{".to_string()),
        Just("}".to_string()),
        Just("(".to_string()),
        Just(")".to_string()),
        Just("[".to_string()),
        Just("^".to_string()),
        Just("9^9^9^9".to_string()),
        Just("\\{".to_string()),
        Just("\\}".to_string()),
        Just("####".to_string()),
        Just("%".to_string()),
        Just("!".to_string()),
        Just("\\text{".to_string()),
        Just("\\begin{pmatrix}".to_string()),
        Just("\\\\".to_string()),
        Just("é".to_string()),
        Just("😀".to_string()),
        Just("\n".to_string()),
        "[0-9]{1,40}",
        "[-+*/=,.x ]",
        any::<String>(),
    ];
    prop::collection::vec(piece, 0..60).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn arbitrary_strings_never_panic(s in any::<String>()) {
        score_all(&s);
    }

    #[test]
    fn adversarial_strings_never_panic(s in adversarial()) {
        score_all(&s);
    }

    #[test]
    fn math_answers_never_panic(g in adversarial(), p in adversarial()) {
        let _ = sobre_reward::math::answers_equivalent(&g, &p);
        let _ = sobre_reward::math::answers_equivalent(&p, &p);
    }
}

#[test]
fn byte_cuts_inside_tags_and_multibyte_chars() {
    // Every prefix at a char boundary of a text with multibyte characters inside tags.
    let text = "<think>\nπ≈3.14 😀\n</think>\n<answer>\n\\boxed{\\frac{é}{2}}\n</answer>";
    for (i, _) in text.char_indices() {
        score_all(&text[..i]);
        score_all(&text[i..]);
    }
    // Invalid UTF-8 in the middle of a tag, decoded lossily as a caller reading bytes would.
    let mut bytes = b"<think>\nx\n</th".to_vec();
    bytes.extend([0xE2, 0x82]);
    bytes.extend(b"ink>\n<answer>\n42\n</answer>");
    score_all(&String::from_utf8_lossy(&bytes));
}

#[test]
fn pathological_inputs_are_fast() {
    let mb = 1 << 20;
    let cases: Vec<(&str, String)> = vec![
        ("1 MB of text", "lorem ipsum dolor ".repeat(mb / 18)),
        (
            "deep parens",
            format!(
                "<answer>{}1{}</answer>",
                "(".repeat(mb / 2 - 20),
                ")".repeat(mb / 2 - 20)
            ),
        ),
        ("deep braces", format!("\\boxed{{{}}}", "{".repeat(mb - 10))),
        ("many boxes", "\\boxed{1".repeat(mb / 8)),
        ("many answer tags", "<answer>1+2</answer>".repeat(mb / 20)),
        ("unclosed tags", "<answer><think>".repeat(mb / 15)),
        (
            "tower",
            format!("<answer>{}9</answer>", "9^".repeat(mb / 2 - 20)),
        ),
        (
            "huge integer",
            format!("<answer>{}</answer>", "9".repeat(mb - 20)),
        ),
        ("repeated words", "the same words again ".repeat(mb / 21)),
        (
            "long format body",
            format!(
                "<think>\n{}\n</think>\n<answer>\n42\n</answer>",
                "a".repeat(mb)
            ),
        ),
        (
            "small tower",
            "<answer>\\boxed{9^9^9^9}</answer>".to_string(),
        ),
        (
            "big power",
            "<answer>\\boxed{10^{100000}}</answer>".to_string(),
        ),
        ("factorial", "<answer>\\boxed{100000!}</answer>".to_string()),
    ];
    let rewards = all_rewards();
    let samples = samples();
    for (name, text) in &cases {
        let start = Instant::now();
        let mut calls = 0u32;
        for s in &samples {
            let b = rewards.score(s, &Completion::new(text));
            assert!(b.total.is_finite());
            calls += b.components.len() as u32;
        }
        let per_call = start.elapsed() / calls;
        println!("{name}: {per_call:?} per reward call");
        // Generous: the test profile is lightly optimised; the bench measures real speed.
        assert!(
            per_call < Duration::from_millis(50),
            "{name}: {per_call:?} per call"
        );
    }
}
