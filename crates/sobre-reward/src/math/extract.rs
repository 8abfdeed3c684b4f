//! Finding the final answer in a completion (and in a dataset's gold answer).
//!
//! Order, as the issue fixes it: the last complete `<answer>…</answer>` (and, inside it, the
//! last `\boxed{…}` if there is one); else the last `\boxed{…}` / `\fbox{…}` anywhere; else a
//! GSM8K-style `#### 42`. Every search is a linear scan, so a 1 MB completion costs one pass.

/// How many `\boxed` occurrences (from the end) are tried before giving up; an unbalanced
/// last one falls back to the one before it. A small cap keeps adversarial inputs linear.
const MAX_BOXED_TRIES: usize = 4;

/// The content of the last complete `<answer>…</answer>` pair, as TinyZero takes it.
pub fn last_answer_tag(text: &str) -> Option<&str> {
    let close = text.rfind("</answer>")?;
    let open = text[..close].rfind("<answer>")?;
    Some(&text[open + "<answer>".len()..close])
}

/// The content of the last balanced `\boxed{…}` (or `\fbox{…}`), nested braces included.
/// `\boxed 5` (no braces) yields the following word.
pub fn last_boxed(text: &str) -> Option<&str> {
    let mut end = text.len();
    for _ in 0..MAX_BOXED_TRIES {
        let hay = &text[..end];
        let (pos, cmd_len) = match (hay.rfind("\\boxed"), hay.rfind("\\fbox")) {
            (Some(a), Some(b)) if b > a => (b, "\\fbox".len()),
            (Some(a), _) => (a, "\\boxed".len()),
            (None, Some(b)) => (b, "\\fbox".len()),
            (None, None) => return None,
        };
        if let Some(inner) = braced_after(text, pos + cmd_len) {
            return Some(inner);
        }
        end = pos;
    }
    None
}

/// After a command at byte `start`: `{…}` with balanced braces, or ` word`.
fn braced_after(text: &str, start: usize) -> Option<&str> {
    let rest = text.get(start..)?;
    let trimmed = rest.trim_start_matches([' ', '\t']);
    let offset = start + (rest.len() - trimmed.len());
    if let Some(body) = trimmed.strip_prefix('{') {
        let body_start = offset + 1;
        let mut depth = 1usize;
        for (i, c) in body.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        return text.get(body_start..body_start + i);
                    }
                }
                _ => {}
            }
        }
        None
    } else if rest.len() != trimmed.len() {
        // `\boxed 5`: the next whitespace-delimited word, minus trailing `$` or punctuation.
        let word = trimmed
            .split(|c: char| c.is_whitespace() || c == '$')
            .next()?;
        (!word.is_empty()).then_some(word)
    } else {
        None
    }
}

/// The text after the last `####` up to the end of that line (GSM8K's answer marker).
pub fn gsm8k_marker(text: &str) -> Option<&str> {
    let pos = text.rfind("####")?;
    let rest = &text[pos + 4..];
    let line = rest.split('\n').next().unwrap_or(rest).trim();
    (!line.is_empty()).then_some(line)
}

/// The final answer a model gave, in the order of precedence (see the module docs).
pub fn extract_answer(completion: &str) -> Option<&str> {
    if let Some(inner) = last_answer_tag(completion) {
        return Some(last_boxed(inner).unwrap_or(inner).trim());
    }
    if let Some(b) = last_boxed(completion) {
        return Some(b.trim());
    }
    gsm8k_marker(completion)
}

/// The gold answer from a dataset's `answer` field: a boxed or `####` answer inside a full
/// solution is taken out; a bare answer (`"42"`, `"\frac{1}{2}"`) is used as it is.
pub fn extract_gold(answer: &str) -> &str {
    if let Some(b) = last_boxed(answer) {
        return b.trim();
    }
    if let Some(m) = gsm8k_marker(answer) {
        return m;
    }
    answer.trim()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_tag_then_boxed_then_marker() {
        assert_eq!(
            extract_answer("<think>x</think><answer> 42 </answer>"),
            Some("42")
        );
        assert_eq!(extract_answer("<answer>so \\boxed{7}</answer>"), Some("7"));
        assert_eq!(
            extract_answer("a \\boxed{1} b \\boxed{\\frac{1}{2}}."),
            Some("\\frac{1}{2}")
        );
        assert_eq!(extract_answer("so\n#### 1,234\n"), Some("1,234"));
        assert_eq!(extract_answer("nothing here"), None);
        assert_eq!(
            extract_answer("<answer>1</answer> <answer>2</answer>"),
            Some("2")
        );
    }

    #[test]
    fn nested_and_unbalanced_boxes() {
        assert_eq!(
            last_boxed("\\boxed{\\frac{a}{b^{2}}}"),
            Some("\\frac{a}{b^{2}}")
        );
        assert_eq!(last_boxed("\\boxed{3} then \\boxed{oops"), Some("3"));
        assert_eq!(last_boxed("\\boxed 5$"), Some("5"));
        assert_eq!(last_boxed("\\fbox{9}"), Some("9"));
    }

    #[test]
    fn gold_from_solution() {
        assert_eq!(extract_gold("He pays 3*4=12.\n#### 12"), "12");
        assert_eq!(extract_gold("$\\boxed{5}$"), "5");
        assert_eq!(extract_gold(" 7 "), "7");
    }
}
