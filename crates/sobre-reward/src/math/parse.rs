//! A small parser for the answers models write: plain arithmetic and the LaTeX subset that
//! final answers use (`\frac`, `\sqrt`, `\pi`, `\{…\}`, intervals, `\cup`, `\le`, `\%`, …).
//!
//! It is deliberately forgiving where math-verify is (implicit multiplication, `\left`, units in
//! `\text{…}`, thousands separators) and strict where math-verify is (`12.` does not parse).
//! Every loop is bounded by the input length, recursion by [`MAX_DEPTH`], and the input itself
//! by [`MAX_ANSWER_LEN`], so no string can make it slow.

use num_bigint::BigInt;
use num_rational::BigRational;
use num_traits::{One, Zero};

/// Longest answer (in bytes) that is parsed at all; longer ones are compared as strings.
pub const MAX_ANSWER_LEN: usize = 2000;
/// Deepest nesting of brackets/operators the recursive-descent parser follows.
pub const MAX_DEPTH: usize = 64;
/// Most tokens in one answer.
const MAX_TOKENS: usize = 600;
/// Longest digit string accepted as one number (bigger numbers are refused, not slowed on).
const MAX_DIGITS: usize = 400;

/// Relation operators of an answer like `x \le 3`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl RelOp {
    /// The operator with its sides swapped (`a < b` ⇔ `b > a`).
    pub fn flipped(self) -> RelOp {
        match self {
            RelOp::Lt => RelOp::Gt,
            RelOp::Gt => RelOp::Lt,
            RelOp::Le => RelOp::Ge,
            RelOp::Ge => RelOp::Le,
            other => other,
        }
    }
}

/// Named functions and constants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Func {
    Sin,
    Cos,
    Tan,
    Sec,
    Csc,
    Cot,
    Asin,
    Acos,
    Atan,
    Sinh,
    Cosh,
    Tanh,
    Ln,
    Exp,
}

/// A parsed answer. Scalars and the structured answers (tuples, sets, intervals, relations) share
/// one tree so that `(1, 2)` can be read as a tuple or an open interval at comparison time.
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    /// An exact number; `float` marks a decimal literal (math-verify rounds those to 6 places).
    Num {
        val: BigRational,
        float: bool,
    },
    Sym(String),
    Pi,
    E,
    /// +∞ (negated by `Neg`).
    Inf,
    Add(Vec<Node>),
    Mul(Vec<Node>),
    Neg(Box<Node>),
    Div(Box<Node>, Box<Node>),
    Pow(Box<Node>, Box<Node>),
    /// `\log_b x` (natural log when `b` is `E`).
    Log(Box<Node>, Box<Node>),
    Func(Func, Box<Node>),
    Fact(Box<Node>),
    Binom(Box<Node>, Box<Node>),
    Abs(Box<Node>),
    Percent(Box<Node>),
    Tuple(Vec<Node>),
    Set(Vec<Node>),
    Interval {
        lo: Box<Node>,
        hi: Box<Node>,
        lo_closed: bool,
        hi_closed: bool,
    },
    Union(Vec<Node>),
    Rel(RelOp, Box<Node>, Box<Node>),
    /// A word answer (`Evelyn`, `(B)`), lower-cased.
    Text(String),
    /// `\begin{pmatrix}…\end{pmatrix}`: rows of cells.
    Matrix(Vec<Vec<Node>>),
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Num(String),
    Letter(char),
    Cmd(String),
    Op(char),
    /// `\{` and `\}`.
    SetOpen,
    SetClose,
    Rel(RelOp),
    Pm,
    Cup,
    /// `\text{…}` and friends: the raw content.
    Text(String),
    /// `\begin{…matrix}`, `\end{…matrix}`, `\\` (row break), `&` (cell break).
    MatOpen,
    MatClose,
    RowSep,
}

/// Parse one answer. `None` when it is not something this parser understands; the caller then
/// falls back to comparing normalised strings.
pub fn parse_answer(s: &str) -> Option<Node> {
    if s.len() > MAX_ANSWER_LEN {
        return None;
    }
    // `12.` is not a number for math-verify, so a trailing `.` is not stripped here.
    let s = normalize(s.trim());
    if let Some(word) = word_answer(&s) {
        return Some(Node::Text(word));
    }
    let toks = tokenize(&s)?;
    if toks.is_empty() {
        return None;
    }
    // `\pm` at the top level expands to the set of both signs.
    if let Some(i) = toks.iter().position(|t| *t == Tok::Pm)
        && toks.iter().filter(|t| **t == Tok::Pm).count() == 1
        && !toks.contains(&Tok::Op(','))
    {
        let mut plus = toks.clone();
        let mut minus = toks;
        plus[i] = Tok::Op('+');
        minus[i] = Tok::Op('-');
        let a = Parser::new(plus).parse_top()?;
        let b = Parser::new(minus).parse_top()?;
        return Some(Node::Set(vec![a, b]));
    }
    Parser::new(toks).parse_top()
}

/// Textual clean-ups that do not need a parser: spacing commands, `\left`, `\dfrac`, degrees,
/// dollar signs, `{,}` separators.
pub fn normalize(s: &str) -> String {
    let mut out = s.to_string();
    const DROP: &[&str] = &[
        "\\left",
        "\\right",
        "\\bigl",
        "\\bigr",
        "\\Bigl",
        "\\Bigr",
        "\\big",
        "\\Big",
        "\\displaystyle",
        "\\!",
        "^{\\circ}",
        "^\\circ",
        "\\circ",
        "°",
        "\\degree",
        "\\$",
        "$",
        "\\limits",
    ];
    for d in DROP {
        if out.contains(d) {
            out = out.replace(d, "");
        }
    }
    const SPACE: &[&str] = &["\\,", "\\;", "\\:", "\\quad", "\\qquad", "~"];
    for d in SPACE {
        if out.contains(d) {
            out = out.replace(d, " ");
        }
    }
    for (from, to) in [
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
        ("\\cfrac", "\\frac"),
        ("{,}", ","),
        ("\\%", "%"),
        ("\\cdot", "*"),
        ("\\times", "*"),
        ("\\div", "/"),
        ("×", "*"),
        ("·", "*"),
        ("÷", "/"),
        ("−", "-"),
        ("≤", "\\le "),
        ("≥", "\\ge "),
        ("≠", "\\ne "),
        ("π", "\\pi "),
        ("∞", "\\infty "),
        ("√", "\\sqrt"),
    ] {
        if out.contains(from) {
            out = out.replace(from, to);
        }
    }
    out.trim().to_string()
}

/// `Evelyn`, `(B)`, `\text{east}`: an answer made only of letters (and spaces) is a word, compared
/// case-insensitively, as math-verify ends up doing. `e` alone stays Euler's number.
fn word_answer(s: &str) -> Option<String> {
    let mut t = s.trim();
    for cmd in [
        "\\text{",
        "\\textbf{",
        "\\mathrm{",
        "\\mathbf{",
        "\\textit{",
        "\\mbox{",
    ] {
        if let Some(inner) = t.strip_prefix(cmd).and_then(|r| r.strip_suffix('}')) {
            if !inner.contains(['{', '}']) {
                t = inner.trim();
            }
            break;
        }
    }
    let t = t
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .unwrap_or(t)
        .trim();
    let letters = !t.is_empty() && t.chars().all(|c| c.is_ascii_alphabetic() || c == ' ');
    if !letters || t == "e" || is_known_word(t) {
        return None;
    }
    Some(t.to_ascii_lowercase())
}

fn is_known_word(t: &str) -> bool {
    matches!(
        t,
        "pi" | "infty" | "inf" | "sqrt" | "exp" | "ln" | "log" | "sin" | "cos" | "tan"
    )
}

const TEXT_CMDS: &[&str] = &[
    "text",
    "textbf",
    "mathrm",
    "mathbf",
    "textit",
    "mbox",
    "operatorname",
    "textrm",
];

/// The lexer: one loop over the input, a branch per token kind (numbers, words and LaTeX
/// commands, operators, brackets); long because the commands it normalises are listed inline.
fn tokenize(s: &str) -> Option<Vec<Tok>> {
    let b = s.as_bytes();
    if !s.is_ascii() {
        return None;
    }
    let mut toks = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if toks.len() > MAX_TOKENS {
            return None;
        }
        let c = b[i] as char;
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        if c.is_ascii_digit() || (c == '.' && b.get(i + 1).is_some_and(|d| d.is_ascii_digit())) {
            let (num, next) = read_number(b, i)?;
            toks.push(Tok::Num(num));
            i = next;
            continue;
        }
        if c.is_ascii_alphabetic() {
            // Plain-text function names (`sqrt(2)`, `pi`) read as their commands.
            let mut j = i;
            while j < b.len() && b[j].is_ascii_alphabetic() {
                j += 1;
            }
            let word = &s[i..j];
            let known = [
                "sqrt", "pi", "sin", "cos", "tan", "ln", "log", "exp", "infty",
            ];
            if let Some(k) = known.iter().find(|k| word == **k) {
                toks.push(Tok::Cmd((*k).to_string()));
                i = j;
            } else {
                toks.push(Tok::Letter(c));
                i += 1;
            }
            continue;
        }
        if c == '\\' {
            let mut j = i + 1;
            while j < b.len() && b[j].is_ascii_alphabetic() {
                j += 1;
            }
            if j == i + 1 {
                // `\{`, `\}`, `\|`, `\\`
                let n = *b.get(i + 1)? as char;
                match n {
                    '{' => toks.push(Tok::SetOpen),
                    '}' => toks.push(Tok::SetClose),
                    '|' => toks.push(Tok::Op('|')),
                    '\\' => toks.push(Tok::RowSep),
                    ' ' => {} // `\ `: a space
                    _ => return None,
                }
                i += 2;
                continue;
            }
            let name = &s[i + 1..j];
            i = j;
            if TEXT_CMDS.contains(&name) {
                let (inner, next) = read_group(s, i)?;
                // `1 \text{ and } 2`, `x = 1 \text{ or } x = 2`: a list of answers.
                match inner.trim() {
                    "and" | "or" | "," => toks.push(Tok::Op(',')),
                    _ => toks.push(Tok::Text(inner.to_string())),
                }
                i = next;
                continue;
            }
            if name == "begin" || name == "end" {
                let (env, next) = read_group(s, i)?;
                if !env.ends_with("matrix") {
                    return None;
                }
                toks.push(if name == "begin" {
                    Tok::MatOpen
                } else {
                    Tok::MatClose
                });
                i = next;
                continue;
            }
            match name {
                "le" | "leq" | "leqslant" => toks.push(Tok::Rel(RelOp::Le)),
                "ge" | "geq" | "geqslant" => toks.push(Tok::Rel(RelOp::Ge)),
                "ne" | "neq" => toks.push(Tok::Rel(RelOp::Ne)),
                "lt" => toks.push(Tok::Rel(RelOp::Lt)),
                "gt" => toks.push(Tok::Rel(RelOp::Gt)),
                "pm" => toks.push(Tok::Pm),
                "cup" => toks.push(Tok::Cup),
                "lvert" | "rvert" | "vert" | "mid" => toks.push(Tok::Op('|')),
                "lbrace" => toks.push(Tok::SetOpen),
                "rbrace" => toks.push(Tok::SetClose),
                "frac" | "sqrt" | "binom" => {
                    toks.push(Tok::Cmd(name.to_string()));
                    // `\frac34`, `\sqrt2`: single-character arguments without braces.
                    let nargs = if name == "sqrt" { 1 } else { 2 };
                    for _ in 0..nargs {
                        while i < b.len() && b[i] == b' ' {
                            i += 1;
                        }
                        match b.get(i) {
                            Some(d) if d.is_ascii_digit() => {
                                toks.push(Tok::Op('{'));
                                toks.push(Tok::Num((*d as char).to_string()));
                                toks.push(Tok::Op('}'));
                                i += 1;
                            }
                            Some(b'{') => {
                                let (inner, next) = read_group(s, i)?;
                                toks.push(Tok::Op('{'));
                                toks.extend(tokenize(inner)?);
                                toks.push(Tok::Op('}'));
                                i = next;
                            }
                            _ => break,
                        }
                    }
                }
                _ => toks.push(Tok::Cmd(name.to_string())),
            }
            continue;
        }
        match c {
            '+' | '-' | '*' | '/' | '^' | '_' | '(' | ')' | '[' | ']' | '{' | '}' | ',' | '!'
            | '|' | '%' => toks.push(Tok::Op(c)),
            // A ratio `1:4` is the fraction 1/4, as math-verify reads it.
            ':' => toks.push(Tok::Op('/')),
            '&' => toks.push(Tok::Op('&')),
            '=' => toks.push(Tok::Rel(RelOp::Eq)),
            '<' | '>' => {
                let eq = b.get(i + 1) == Some(&b'=');
                let op = match (c, eq) {
                    ('<', true) => RelOp::Le,
                    ('<', false) => RelOp::Lt,
                    (_, true) => RelOp::Ge,
                    _ => RelOp::Gt,
                };
                toks.push(Tok::Rel(op));
                if eq {
                    i += 1;
                }
            }
            _ => return None,
        }
        i += 1;
    }
    Some(toks)
}

/// Digits with optional thousands groups (`1,234,567`: every group exactly three digits) and an
/// optional decimal part. A trailing `.` with no digits is refused, as math-verify refuses `12.`.
fn read_number(b: &[u8], start: usize) -> Option<(String, usize)> {
    let mut s = String::new();
    let mut i = start;
    while i < b.len() && b[i].is_ascii_digit() {
        s.push(b[i] as char);
        i += 1;
    }
    // thousands separators
    while i + 3 < b.len() + 1
        && b.get(i) == Some(&b',')
        && b.get(i + 1..i + 4)
            .is_some_and(|g| g.iter().all(u8::is_ascii_digit))
        && !b.get(i + 4).is_some_and(u8::is_ascii_digit)
        && !s.is_empty()
    {
        s.extend(b[i + 1..i + 4].iter().map(|&d| d as char));
        i += 4;
    }
    if b.get(i) == Some(&b'.') {
        if b.get(i + 1).is_some_and(u8::is_ascii_digit) {
            s.push('.');
            i += 1;
            while i < b.len() && b[i].is_ascii_digit() {
                s.push(b[i] as char);
                i += 1;
            }
        } else {
            return None;
        }
    }
    if s.len() > MAX_DIGITS {
        return None;
    }
    Some((s, i))
}

/// `{…}` starting at byte `i` (which must be `{`): its content and the index after `}`.
fn read_group(s: &str, i: usize) -> Option<(&str, usize)> {
    let b = s.as_bytes();
    if b.get(i) != Some(&b'{') {
        return None;
    }
    let mut depth = 0usize;
    for (j, &c) in b.iter().enumerate().skip(i) {
        match c {
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return Some((&s[i + 1..j], j + 1));
                }
            }
            _ => {}
        }
    }
    None
}

/// A decimal string (`"12.50"`) as an exact rational.
pub fn decimal_to_rational(s: &str) -> Option<BigRational> {
    let (int, frac) = match s.split_once('.') {
        Some((a, b)) => (a, b),
        None => (s, ""),
    };
    let digits = format!("{int}{frac}");
    let num: BigInt = if digits.is_empty() {
        BigInt::zero()
    } else {
        digits.parse().ok()?
    };
    let den = num_traits::pow(BigInt::from(10u32), frac.len());
    Some(BigRational::new(num, den))
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
    depth: usize,
}

impl Parser {
    fn new(toks: Vec<Tok>) -> Self {
        Parser {
            toks,
            pos: 0,
            depth: 0,
        }
    }

    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn eat(&mut self, t: &Tok) -> bool {
        if self.peek() == Some(t) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn enter(&mut self) -> Option<()> {
        self.depth += 1;
        (self.depth <= MAX_DEPTH).then_some(())
    }

    fn leave(&mut self) {
        self.depth = self.depth.saturating_sub(1);
    }

    /// Whole answer: a comma list (a set, as math-verify reads `1, 2`) of unions/relations.
    fn parse_top(mut self) -> Option<Node> {
        let mut items = vec![self.parse_union()?];
        while self.eat(&Tok::Op(',')) {
            items.push(self.parse_union()?);
        }
        if self.pos != self.toks.len() {
            return None;
        }
        Some(if items.len() == 1 {
            items.pop()?
        } else {
            Node::Set(items)
        })
    }

    fn parse_union(&mut self) -> Option<Node> {
        let first = self.parse_relation()?;
        if self.peek() != Some(&Tok::Cup) {
            return Some(first);
        }
        let mut parts = vec![first];
        while self.eat(&Tok::Cup) {
            parts.push(self.parse_relation()?);
        }
        Some(Node::Union(parts))
    }

    fn parse_relation(&mut self) -> Option<Node> {
        let lhs = self.parse_sum()?;
        if let Some(Tok::Rel(op)) = self.peek().cloned() {
            self.pos += 1;
            let rhs = self.parse_sum()?;
            // `0 < x < 1` and longer chains are not supported.
            if matches!(self.peek(), Some(Tok::Rel(_))) {
                return None;
            }
            return Some(Node::Rel(op, Box::new(lhs), Box::new(rhs)));
        }
        Some(lhs)
    }

    fn parse_sum(&mut self) -> Option<Node> {
        self.enter()?;
        let mut terms = vec![self.parse_term()?];
        loop {
            match self.peek() {
                Some(Tok::Op('+')) => {
                    self.pos += 1;
                    terms.push(self.parse_term()?);
                }
                Some(Tok::Op('-')) => {
                    self.pos += 1;
                    terms.push(Node::Neg(Box::new(self.parse_term()?)));
                }
                _ => break,
            }
        }
        self.leave();
        Some(if terms.len() == 1 {
            terms.pop()?
        } else {
            Node::Add(terms)
        })
    }

    fn parse_term(&mut self) -> Option<Node> {
        let mut acc = self.parse_unary()?;
        loop {
            match self.peek() {
                Some(Tok::Op('*')) => {
                    self.pos += 1;
                    let r = self.parse_unary()?;
                    acc = mul(acc, r);
                }
                Some(Tok::Op('/')) => {
                    self.pos += 1;
                    let r = self.parse_unary()?;
                    acc = Node::Div(Box::new(acc), Box::new(r));
                }
                Some(Tok::Text(_)) => {
                    // A unit after a value (`3\text{ cm}`, `5\text{ apples}^2`): dropped.
                    self.pos += 1;
                    if self.eat(&Tok::Op('^')) {
                        self.parse_unary()?;
                    }
                }
                Some(t) if starts_primary(t) => {
                    // Implicit multiplication: `2x`, `2\sqrt{2}`, `(x+1)(x-1)`; a number
                    // followed by `\frac{int}{int}` is a mixed number (`2\frac{1}{4}` = 9/4).
                    if let (Node::Num { .. }, Tok::Cmd(c)) = (&acc, t)
                        && c == "frac"
                    {
                        let save = self.pos;
                        let r = self.parse_postfix()?;
                        if let Node::Div(n, d) = &r
                            && is_int_lit(n)
                            && is_int_lit(d)
                        {
                            acc = Node::Add(vec![acc, r]);
                            continue;
                        }
                        self.pos = save;
                    }
                    let r = self.parse_postfix()?;
                    acc = mul(acc, r);
                }
                _ => break,
            }
        }
        Some(acc)
    }

    fn parse_unary(&mut self) -> Option<Node> {
        self.enter()?;
        let r = match self.peek() {
            Some(Tok::Op('-')) => {
                self.pos += 1;
                Some(Node::Neg(Box::new(self.parse_unary()?)))
            }
            Some(Tok::Op('+')) => {
                self.pos += 1;
                self.parse_unary()
            }
            _ => self.parse_postfix(),
        };
        self.leave();
        r
    }

    fn parse_postfix(&mut self) -> Option<Node> {
        self.enter()?;
        let mut base = self.parse_primary()?;
        loop {
            match self.peek() {
                Some(Tok::Op('^')) => {
                    self.pos += 1;
                    // Right-associative; the exponent may carry its own sign (`10^{-3}`).
                    let exp = match self.peek() {
                        Some(Tok::Op('-')) => {
                            self.pos += 1;
                            Node::Neg(Box::new(self.parse_postfix()?))
                        }
                        _ => self.parse_postfix()?,
                    };
                    base = Node::Pow(Box::new(base), Box::new(exp));
                }
                Some(Tok::Op('!')) => {
                    self.pos += 1;
                    base = Node::Fact(Box::new(base));
                }
                Some(Tok::Op('%')) => {
                    self.pos += 1;
                    base = Node::Percent(Box::new(base));
                }
                _ => break,
            }
        }
        self.leave();
        Some(base)
    }

    /// `{…}` as a group: one expression.
    fn parse_group(&mut self) -> Option<Node> {
        if !self.eat(&Tok::Op('{')) {
            // Unbraced single-token argument (`\sqrt x`, `\sin x`).
            return self.parse_postfix_noexp();
        }
        self.enter()?;
        let inner = self.parse_union()?;
        self.leave();
        self.eat(&Tok::Op('}')).then_some(inner)
    }

    /// A primary without postfix exponent (for `\sin x^2` ≈ sin(x)^2 ambiguity we follow sympy's
    /// latex parser loosely: the argument is one primary).
    fn parse_postfix_noexp(&mut self) -> Option<Node> {
        self.parse_primary()
    }

    fn parse_primary(&mut self) -> Option<Node> {
        self.enter()?;
        let r = self.parse_primary_inner();
        self.leave();
        r
    }

    fn parse_primary_inner(&mut self) -> Option<Node> {
        match self.next()? {
            Tok::Num(s) => {
                let float = s.contains('.');
                Some(Node::Num {
                    val: decimal_to_rational(&s)?,
                    float,
                })
            }
            Tok::Letter('e') => Some(Node::E),
            Tok::Letter(c) => Some(Node::Sym(c.to_ascii_lowercase().to_string())),
            Tok::Text(t) => {
                // A `\text{…}` where a value is expected: its content, if it is one.
                let inner = parse_answer(&t)?;
                Some(inner)
            }
            Tok::Op('{') => {
                let inner = self.parse_list_until(&Tok::Op('}'))?;
                match inner.len() {
                    1 => inner.into_iter().next(),
                    _ => Some(Node::Set(inner)),
                }
            }
            Tok::SetOpen => {
                if self.eat(&Tok::SetClose) {
                    return Some(Node::Set(vec![]));
                }
                let items = self.parse_list_until(&Tok::SetClose)?;
                Some(Node::Set(items))
            }
            Tok::Op('|') => {
                let inner = self.parse_sum()?;
                self.eat(&Tok::Op('|')).then(|| Node::Abs(Box::new(inner)))
            }
            Tok::Op(open @ ('(' | '[')) => self.parse_bracketed(open == '['),
            Tok::MatOpen => {
                let mut rows = vec![vec![self.parse_sum()?]];
                loop {
                    match self.next()? {
                        Tok::Op('&') => rows.last_mut()?.push(self.parse_sum()?),
                        Tok::RowSep if self.peek() == Some(&Tok::MatClose) => {}
                        Tok::RowSep => rows.push(vec![self.parse_sum()?]),
                        Tok::MatClose => return Some(Node::Matrix(rows)),
                        _ => return None,
                    }
                }
            }
            Tok::Cmd(c) => self.parse_command(&c),
            _ => None,
        }
    }

    /// Items separated by commas up to `close` (consumed).
    fn parse_list_until(&mut self, close: &Tok) -> Option<Vec<Node>> {
        let mut items = vec![self.parse_union()?];
        while self.eat(&Tok::Op(',')) {
            items.push(self.parse_union()?);
        }
        self.eat(close).then_some(items)
    }

    /// `( … )`, `[ … ]` and the mixed intervals `[a, b)`, `(a, b]`.
    fn parse_bracketed(&mut self, open_square: bool) -> Option<Node> {
        let mut items = vec![self.parse_union()?];
        while self.eat(&Tok::Op(',')) {
            items.push(self.parse_union()?);
        }
        let close_square = match self.next()? {
            Tok::Op(')') => false,
            Tok::Op(']') => true,
            _ => return None,
        };
        match (items.len(), open_square, close_square) {
            (1, false, false) | (1, true, true) => items.pop(),
            (2, false, false) => Some(Node::Tuple(items)),
            (2, _, _) => {
                let hi = items.pop()?;
                let lo = items.pop()?;
                Some(Node::Interval {
                    lo: Box::new(lo),
                    hi: Box::new(hi),
                    lo_closed: open_square,
                    hi_closed: close_square,
                })
            }
            (_, false, false) | (_, true, true) => Some(Node::Tuple(items)),
            _ => None,
        }
    }

    fn parse_command(&mut self, c: &str) -> Option<Node> {
        let func = |f: Func| f;
        let f = match c {
            "frac" => {
                let n = self.parse_group()?;
                let d = self.parse_group()?;
                return Some(Node::Div(Box::new(n), Box::new(d)));
            }
            "binom" => {
                let n = self.parse_group()?;
                let k = self.parse_group()?;
                return Some(Node::Binom(Box::new(n), Box::new(k)));
            }
            "sqrt" => {
                // `\sqrt[n]{x}`
                if self.eat(&Tok::Op('[')) {
                    let n = self.parse_sum()?;
                    if !self.eat(&Tok::Op(']')) {
                        return None;
                    }
                    let x = self.parse_group()?;
                    let one = Node::Num {
                        val: BigRational::one(),
                        float: false,
                    };
                    return Some(Node::Pow(
                        Box::new(x),
                        Box::new(Node::Div(Box::new(one), Box::new(n))),
                    ));
                }
                let x = self.parse_group()?;
                let half = Node::Num {
                    val: BigRational::new(1.into(), 2.into()),
                    float: false,
                };
                return Some(Node::Pow(Box::new(x), Box::new(half)));
            }
            "pi" => return Some(Node::Pi),
            "infty" | "infin" => return Some(Node::Inf),
            "emptyset" | "varnothing" => return Some(Node::Set(vec![])),
            "mathbb" => {
                let (inner_ok, _) = (self.eat(&Tok::Op('{')), ());
                let r = matches!(self.next(), Some(Tok::Letter('R')));
                if !(inner_ok && r && self.eat(&Tok::Op('}'))) {
                    return None;
                }
                return Some(Node::Interval {
                    lo: Box::new(Node::Neg(Box::new(Node::Inf))),
                    hi: Box::new(Node::Inf),
                    lo_closed: false,
                    hi_closed: false,
                });
            }
            "log" | "lg" => {
                // `\log_2 8`, `\log_{10}(x)`; bare `\log` is base 10, as math-verify reads it.
                let ten = Node::Num {
                    val: BigRational::from_integer(10.into()),
                    float: false,
                };
                let base = if self.eat(&Tok::Op('_')) {
                    self.parse_group()?
                } else {
                    ten
                };
                let x = self.parse_func_arg()?;
                return Some(Node::Log(Box::new(base), Box::new(x)));
            }
            "ln" => {
                let x = self.parse_func_arg()?;
                return Some(Node::Log(Box::new(Node::E), Box::new(x)));
            }
            "exp" => func(Func::Exp),
            "sin" => Func::Sin,
            "cos" => Func::Cos,
            "tan" => Func::Tan,
            "sec" => Func::Sec,
            "csc" => Func::Csc,
            "cot" => Func::Cot,
            "arcsin" => Func::Asin,
            "arccos" => Func::Acos,
            "arctan" => Func::Atan,
            "sinh" => Func::Sinh,
            "cosh" => Func::Cosh,
            "tanh" => Func::Tanh,
            // Greek letters and other symbols are variables.
            "alpha" | "beta" | "gamma" | "delta" | "theta" | "lambda" | "mu" | "sigma" | "phi"
            | "omega" | "tau" | "rho" | "epsilon" | "varepsilon" | "varphi" | "psi" | "eta"
            | "xi" | "zeta" | "kappa" | "nu" => {
                return Some(Node::Sym(c.to_string()));
            }
            _ => return None,
        };
        // `\sin^2 x` = (sin x)^2
        let power = if self.eat(&Tok::Op('^')) {
            Some(self.parse_group()?)
        } else {
            None
        };
        let x = self.parse_func_arg()?;
        let applied = Node::Func(f, Box::new(x));
        Some(match power {
            Some(p) => Node::Pow(Box::new(applied), Box::new(p)),
            None => applied,
        })
    }

    /// `\sin(x)`, `\sin{x}`, `\sin x`, `\ln 2`: a bracketed group or one primary with its exponent.
    fn parse_func_arg(&mut self) -> Option<Node> {
        match self.peek() {
            Some(Tok::Op('(')) | Some(Tok::Op('{')) => self.parse_postfix(),
            _ => {
                // `\sin 2x` reads as sin(2x) in sympy's LaTeX parser: a number and letters.
                let mut acc = self.parse_postfix()?;
                while let Some(Tok::Letter(_)) = self.peek() {
                    let r = self.parse_postfix()?;
                    acc = mul(acc, r);
                }
                Some(acc)
            }
        }
    }
}

fn starts_primary(t: &Tok) -> bool {
    match t {
        Tok::Num(_) | Tok::Letter(_) | Tok::SetOpen => true,
        Tok::Op(c) => matches!(c, '(' | '{' | '['),
        Tok::Cmd(c) => c != "cup",
        _ => false,
    }
}

fn is_int_lit(n: &Node) -> bool {
    matches!(n, Node::Num { val, float: false } if val.is_integer())
}

fn mul(a: Node, b: Node) -> Node {
    match a {
        Node::Mul(mut v) => {
            v.push(b);
            Node::Mul(v)
        }
        a => Node::Mul(vec![a, b]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Node {
        match parse_answer(s) {
            Some(n) => n,
            None => panic!("did not parse: {s}"),
        }
    }

    #[test]
    fn numbers_and_separators() {
        assert!(matches!(p("1,234,567"), Node::Num { .. }));
        assert!(matches!(p("1,2"), Node::Set(_)));
        assert!(parse_answer("12.").is_none()); // as math-verify: not a number
        assert!(matches!(p(".5"), Node::Num { float: true, .. }));
    }

    #[test]
    fn structures() {
        assert!(matches!(p("(1,2)"), Node::Tuple(_)));
        assert!(matches!(
            p("[1,2)"),
            Node::Interval {
                lo_closed: true,
                hi_closed: false,
                ..
            }
        ));
        assert!(matches!(p("\\{1,2\\}"), Node::Set(_)));
        assert!(matches!(p("(0,1)\\cup(2,3)"), Node::Union(_)));
        assert!(matches!(p("x \\le 3"), Node::Rel(RelOp::Le, _, _)));
        assert!(matches!(p("\\text{Evelyn}"), Node::Text(_)));
        assert!(matches!(p("\\pm 2"), Node::Set(_)));
    }

    #[test]
    fn latex_forms() {
        for s in [
            "\\frac{1}{2}",
            "\\frac12",
            "\\sqrt[3]{27}",
            "2\\sqrt{2}",
            "\\sin^2 x + \\cos^2 x",
            "\\log_2 8",
            "3\\text{ cm}",
        ] {
            p(s);
        }
    }
}
