//! Math answers: finding the final answer ([`extract`]), reading it ([`parse`]) and deciding
//! whether it equals the gold answer ([`equiv`]).

pub mod equiv;
pub mod extract;
pub mod parse;

pub use extract::{extract_answer, extract_gold};

/// Whitespace-free form used for the quick string check and the string fallback.
fn squash(s: &str) -> String {
    parse::normalize(s)
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect()
}

/// Is the answer `pred` mathematically equivalent to the gold answer `gold`?
///
/// Both are bare answers (already extracted). When either does not parse, the normalised strings
/// (LaTeX spacing, `$`, `\left` removed; whitespace ignored) are compared instead, as math-verify
/// falls back to string comparison.
pub fn answers_equivalent(gold: &str, pred: &str) -> bool {
    if gold.len() > parse::MAX_ANSWER_LEN || pred.len() > parse::MAX_ANSWER_LEN {
        return false;
    }
    // Quick path: identical after LaTeX clean-up. Spaces still count here (`1 0` is not `10`).
    let (g, p) = (parse::normalize(gold), parse::normalize(pred));
    if g.is_empty() || p.is_empty() {
        return false;
    }
    if g == p {
        return true;
    }
    match (parse::parse_answer(gold), parse::parse_answer(pred)) {
        (Some(a), Some(b)) => equiv::equivalent(&a, &b),
        // Something we cannot read: equal only as strings, spacing aside.
        _ => squash(gold) == squash(pred),
    }
}

#[cfg(test)]
mod tests {
    use super::answers_equivalent as eq;

    #[test]
    fn numbers() {
        assert!(eq("1000", "1,000"));
        assert!(eq("0.5", "\\frac{1}{2}"));
        assert!(eq("\\frac{1}{3}", "0.333333"));
        assert!(!eq("\\frac{1}{3}", "0.333"));
        assert!(!eq("1", "0.9999999"));
        assert!(eq("50\\%", "50"));
        assert!(eq("50\\%", "0.5"));
        assert!(!eq("12.5\\%", "12.5"));
        assert!(eq("2\\sqrt{2}", "\\sqrt{8}"));
        assert!(eq("1500", "1.5 \\times 10^3"));
        assert!(!eq("1000", "1e3"));
        assert!(eq("9", "\\sqrt{81}"));
        assert!(eq("\\frac{9}{4}", "2\\frac{1}{4}"));
        assert!(!eq("-5", "5"));
        assert!(!eq("12", "12."));
    }

    #[test]
    fn structures_and_expressions() {
        assert!(eq("\\{1,2\\}", "\\{2,1\\}"));
        assert!(!eq("(1,2)", "(2,1)"));
        assert!(eq("(1, 2, 3)", "1,2,3"));
        assert!(!eq("[1,2)", "(1,2)"));
        assert!(eq("x^2+2x+1", "(x+1)^2"));
        assert!(!eq("\\sqrt{x^2}", "x"));
        assert!(eq("x = 3", "3"));
        assert!(eq("\\text{Evelyn}", "Evelyn"));
        assert!(eq("\\pm 2", "2,-2"));
        assert!(eq("\\sin^2 x + \\cos^2 x", "1"));
    }

    #[test]
    fn adversarial_is_cheap() {
        assert!(!eq("9^9^9^9", "1"));
        assert!(eq("9^9^9^9", "9^9^9^9"));
        assert!(!eq("10^{100000}", "10^{99999}"));
        let deep = "(".repeat(5000) + "1" + &")".repeat(5000);
        assert!(!eq(&deep, "2"));
    }
}
