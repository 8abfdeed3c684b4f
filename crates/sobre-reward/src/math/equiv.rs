//! Mathematical equivalence of two parsed answers, aiming at math-verify's verdicts.
//!
//! Numbers are exact rationals wherever the answer allows (integers, decimals, fractions,
//! percentages, integer powers, perfect roots, factorials, binomials); irrational values
//! (`\sqrt{2}`, `\pi`, `e`, `\ln 2`) are f64. The rules, each taken from math-verify's behaviour:
//!
//! - equal exact values are equal; a decimal literal or an irrational value also matches when
//!   both round to the same 6 decimal places (`1/3` = `0.333333`), except that an exact integer
//!   never matches a near miss (`1` ≠ `0.9999999`);
//! - `x%` matches `x/100`, and also `x` when `x` is an integer (`50\%` = `50`);
//! - `x = 3` matches `3` (the right side of an equation whose left side is a variable);
//! - sets (`\{…\}`, bare `1, 2`) are compared without order and match tuples with the same
//!   elements; tuples are compared in order; `(a, b)` doubles as an open interval; intervals
//!   compare endpoints and closedness; unions compare as sets of intervals;
//! - expressions with variables are equal when they agree at sampled points (negative points
//!   included, so `\sqrt{x^2}` ≠ `x`).

use super::parse::{Func, Node, RelOp};
use num_bigint::BigInt;
use num_rational::BigRational;
use num_traits::{One, Signed, ToPrimitive, Zero};

/// Largest integer exponent evaluated exactly; bigger ones go to f64 (and overflow to ∞ there),
/// which is how `9^9^9^9` stays cheap.
const MAX_EXACT_EXP: u64 = 1024;
/// Largest result (in bits) an exact power may produce.
const MAX_EXACT_BITS: u64 = 8192;
/// Largest `n` for `n!` and `\binom{n}{k}`.
const MAX_FACTORIAL: u64 = 300;

/// A constant's value.
#[derive(Debug, Clone)]
pub enum Val {
    /// Exact; `float` when a decimal literal took part.
    Exact { v: BigRational, float: bool },
    /// Irrational (or too big for exact arithmetic).
    Approx { v: f64, float: bool },
}

impl Val {
    fn exact(v: BigRational) -> Val {
        Val::Exact { v, float: false }
    }

    fn float_flag(&self) -> bool {
        match self {
            Val::Exact { float, .. } | Val::Approx { float, .. } => *float,
        }
    }

    fn to_f64(&self) -> f64 {
        match self {
            Val::Exact { v, .. } => ratio_to_f64(v),
            Val::Approx { v, .. } => *v,
        }
    }

    /// An exact integer not written as a decimal: math-verify never lets such a value match a
    /// rounded neighbour.
    fn is_plain_integer(&self) -> bool {
        matches!(self, Val::Exact { v, float: false } if v.is_integer())
    }
}

fn ratio_to_f64(v: &BigRational) -> f64 {
    v.to_f64().unwrap_or_else(|| {
        let n = v.numer().to_f64().unwrap_or(f64::NAN);
        let d = v.denom().to_f64().unwrap_or(f64::NAN);
        n / d
    })
}

fn approx(v: f64, float: bool) -> Val {
    Val::Approx { v, float }
}

/// Value of a constant expression; `None` when it has variables, is not a scalar, or is
/// undefined (division by zero).
pub fn eval(node: &Node) -> Option<Val> {
    Some(match node {
        Node::Num { val, float } => Val::Exact {
            v: val.clone(),
            float: *float,
        },
        Node::Pi => approx(std::f64::consts::PI, false),
        Node::E => approx(std::f64::consts::E, false),
        Node::Inf => approx(f64::INFINITY, false),
        Node::Add(terms) => {
            let mut acc = Val::exact(BigRational::zero());
            for t in terms {
                acc = binop(acc, eval(t)?, |a, b| Some(a + b), |a, b| a + b)?;
            }
            acc
        }
        Node::Mul(fs) => {
            let mut acc = Val::exact(BigRational::one());
            for f in fs {
                acc = binop(acc, eval(f)?, |a, b| Some(a * b), |a, b| a * b)?;
            }
            acc
        }
        Node::Neg(x) => match eval(x)? {
            Val::Exact { v, float } => Val::Exact { v: -v, float },
            Val::Approx { v, float } => approx(-v, float),
        },
        Node::Div(a, b) => {
            let (a, b) = (eval(a)?, eval(b)?);
            if let Val::Exact { v, .. } = &b
                && v.is_zero()
            {
                return None;
            }
            binop(a, b, |a, b| Some(a / b), |a, b| a / b)?
        }
        Node::Pow(b, e) => pow(eval(b)?, eval(e)?)?,
        Node::Percent(x) => {
            let v = eval(x)?;
            binop(
                v,
                Val::exact(BigRational::from_integer(100.into())),
                |a, b| Some(a / b),
                |a, b| a / b,
            )?
        }
        Node::Abs(x) => match eval(x)? {
            Val::Exact { v, float } => Val::Exact { v: v.abs(), float },
            Val::Approx { v, float } => approx(v.abs(), float),
        },
        Node::Fact(x) => {
            let n = small_uint(&eval(x)?)?;
            if n > MAX_FACTORIAL {
                return None;
            }
            let mut acc = BigInt::one();
            for i in 2..=n {
                acc *= i;
            }
            Val::exact(BigRational::from_integer(acc))
        }
        Node::Binom(n, k) => {
            let (n, k) = (small_uint(&eval(n)?)?, small_uint(&eval(k)?)?);
            if n > MAX_FACTORIAL || k > n {
                return None;
            }
            let mut acc = BigRational::one();
            for i in 0..k {
                acc = acc * BigRational::from_integer((n - i).into())
                    / BigRational::from_integer((i + 1).into());
            }
            Val::exact(acc)
        }
        Node::Log(base, x) => {
            let (b, x) = (eval(base)?, eval(x)?);
            // `\log_2 8` = 3 exactly when the argument is an exact power of the base.
            if let (
                Val::Exact {
                    v: bv,
                    float: false,
                },
                Val::Exact {
                    v: xv,
                    float: false,
                },
            ) = (&b, &x)
                && bv.is_integer()
                && bv > &BigRational::one()
                && xv.is_integer()
                && xv.is_positive()
            {
                let mut p = BigRational::one();
                for k in 0..64u32 {
                    if &p == xv {
                        return Some(Val::exact(BigRational::from_integer(k.into())));
                    }
                    if &p > xv {
                        break;
                    }
                    p *= bv;
                }
            }
            approx(
                x.to_f64().ln() / b.to_f64().ln(),
                b.float_flag() || x.float_flag(),
            )
        }
        Node::Func(f, x) => {
            let x = eval(x)?;
            approx(apply(*f, x.to_f64()), x.float_flag())
        }
        _ => return None,
    })
}

fn small_uint(v: &Val) -> Option<u64> {
    match v {
        Val::Exact { v, .. } if v.is_integer() && !v.is_negative() => v.to_integer().to_u64(),
        _ => None,
    }
}

fn binop(
    a: Val,
    b: Val,
    exact: impl Fn(BigRational, BigRational) -> Option<BigRational>,
    float: impl Fn(f64, f64) -> f64,
) -> Option<Val> {
    let flag = a.float_flag() || b.float_flag();
    Some(match (a, b) {
        (Val::Exact { v: x, .. }, Val::Exact { v: y, .. }) => Val::Exact {
            v: exact(x, y)?,
            float: flag,
        },
        (a, b) => approx(float(a.to_f64(), b.to_f64()), flag),
    })
}

fn pow(base: Val, exp: Val) -> Option<Val> {
    let flag = base.float_flag() || exp.float_flag();
    if let (Val::Exact { v: b, .. }, Val::Exact { v: e, .. }) = (&base, &exp) {
        if e.is_integer() {
            let n = e.to_integer().abs().to_u64();
            let bits = b.numer().bits().max(b.denom().bits()).max(1);
            if let Some(n) = n
                && n <= MAX_EXACT_EXP
                && bits.saturating_mul(n) <= MAX_EXACT_BITS
            {
                if b.is_zero() && e.is_negative() {
                    return None;
                }
                let p = num_traits::pow(b.clone(), n as usize);
                let v = if e.is_negative() { p.recip() } else { p };
                return Some(Val::Exact { v, float: flag });
            }
        } else if !b.is_negative() {
            // Perfect roots stay exact: `\sqrt{81}` = 9, `27^{1/3}` = 3, `4^{3/2}` = 8.
            if let (Some(q), Some(p)) = (e.denom().to_u32(), e.numer().to_i32())
                && q <= 16
                && p.unsigned_abs() <= 64
                && let (Some(rn), Some(rd)) = (int_root(b.numer(), q), int_root(b.denom(), q))
            {
                let root = BigRational::new(rn, rd);
                return pow(
                    Val::Exact {
                        v: root,
                        float: flag,
                    },
                    Val::exact(BigRational::from_integer(p.into())),
                );
            }
        }
    }
    let (b, e) = (base.to_f64(), exp.to_f64());
    let r = b.powf(e);
    // An overflowing power of finite numbers is not a value we can compare honestly.
    if !r.is_finite() && b.is_finite() && e.is_finite() {
        return None;
    }
    Some(approx(r, flag))
}

/// The exact `q`-th root of a non-negative integer, if it is one.
fn int_root(n: &BigInt, q: u32) -> Option<BigInt> {
    let f = n.to_f64()?;
    if !f.is_finite() || f > 1e300 {
        return None;
    }
    let guess = f.powf(1.0 / f64::from(q)).round();
    for d in [-1.0, 0.0, 1.0] {
        let c = guess + d;
        if c < 0.0 {
            continue;
        }
        let c = BigInt::from(c as u64);
        if num_traits::pow(c.clone(), q as usize) == *n {
            return Some(c);
        }
    }
    None
}

fn apply(f: Func, x: f64) -> f64 {
    match f {
        Func::Sin => x.sin(),
        Func::Cos => x.cos(),
        Func::Tan => x.tan(),
        Func::Sec => 1.0 / x.cos(),
        Func::Csc => 1.0 / x.sin(),
        Func::Cot => 1.0 / x.tan(),
        Func::Asin => x.asin(),
        Func::Acos => x.acos(),
        Func::Atan => x.atan(),
        Func::Sinh => x.sinh(),
        Func::Cosh => x.cosh(),
        Func::Tanh => x.tanh(),
        Func::Ln => x.ln(),
        Func::Exp => x.exp(),
    }
}

/// f64 value with variables bound by `env`; NaN where undefined.
fn eval_at(node: &Node, env: &[(String, f64)]) -> f64 {
    match node {
        Node::Sym(s) => env
            .iter()
            .find(|(k, _)| k == s)
            .map_or(f64::NAN, |(_, v)| *v),
        Node::Add(ts) => ts.iter().map(|t| eval_at(t, env)).sum(),
        Node::Mul(fs) => fs.iter().map(|f| eval_at(f, env)).product(),
        Node::Neg(x) => -eval_at(x, env),
        Node::Div(a, b) => eval_at(a, env) / eval_at(b, env),
        Node::Pow(b, e) => eval_at(b, env).powf(eval_at(e, env)),
        Node::Percent(x) => eval_at(x, env) / 100.0,
        Node::Abs(x) => eval_at(x, env).abs(),
        Node::Log(b, x) => eval_at(x, env).ln() / eval_at(b, env).ln(),
        Node::Func(f, x) => apply(*f, eval_at(x, env)),
        other => eval(other).map_or(f64::NAN, |v| v.to_f64()),
    }
}

fn symbols(node: &Node, out: &mut Vec<String>) {
    match node {
        Node::Sym(s) if !out.contains(s) => {
            out.push(s.clone());
        }
        Node::Add(v) | Node::Mul(v) | Node::Tuple(v) | Node::Set(v) | Node::Union(v) => {
            v.iter().for_each(|n| symbols(n, out))
        }
        Node::Neg(x) | Node::Fact(x) | Node::Abs(x) | Node::Percent(x) | Node::Func(_, x) => {
            symbols(x, out)
        }
        Node::Div(a, b)
        | Node::Pow(a, b)
        | Node::Log(a, b)
        | Node::Binom(a, b)
        | Node::Rel(_, a, b) => {
            symbols(a, out);
            symbols(b, out);
        }
        Node::Interval { lo, hi, .. } => {
            symbols(lo, out);
            symbols(hi, out);
        }
        Node::Matrix(rows) => rows.iter().flatten().for_each(|n| symbols(n, out)),
        _ => {}
    }
}

/// Are two constant values equal under math-verify's rounding rules (see the module docs)?
pub fn values_equal(a: &Val, b: &Val) -> bool {
    if let (Val::Exact { v: x, float: fx }, Val::Exact { v: y, float: fy }) = (a, b) {
        if x == y {
            return true;
        }
        if a.is_plain_integer() || b.is_plain_integer() || (!fx && !fy) {
            return false;
        }
        return round6(x) == round6(y);
    }
    let (x, y) = (a.to_f64(), b.to_f64());
    if !x.is_finite() || !y.is_finite() {
        return x == y;
    }
    let scale = x.abs().max(y.abs()).max(1.0);
    if a.is_plain_integer() || b.is_plain_integer() {
        return (x - y).abs() <= 1e-12 * scale;
    }
    if !a.float_flag() && !b.float_flag() {
        return (x - y).abs() <= 1e-9 * scale;
    }
    if scale < 1e9 {
        (x * 1e6).round() == (y * 1e6).round()
    } else {
        (x - y).abs() <= 1e-12 * scale
    }
}

/// Round to 6 decimal places, half away from zero, exactly.
fn round6(v: &BigRational) -> BigInt {
    let scaled = v * BigRational::from_integer(1_000_000.into());
    scaled.round().to_integer()
}

/// The values a top-level scalar may stand for: `x%` is `x/100`, or `x` when `x` is an integer.
fn candidates(node: &Node) -> Vec<Val> {
    let mut out = Vec::with_capacity(2);
    if let Some(v) = eval(node) {
        out.push(v);
    }
    if let Node::Percent(x) = node
        && let Some(v) = eval(x)
        && v.is_plain_integer()
    {
        out.push(v);
    }
    out
}

/// Sample points for expressions in variables: several magnitudes and both signs.
const SAMPLES: [f64; 7] = [0.73, 1.37, 2.21, -0.61, -1.93, 3.17, 0.29];

fn scalar_equal(a: &Node, b: &Node) -> bool {
    let mut syms = Vec::new();
    symbols(a, &mut syms);
    symbols(b, &mut syms);
    if syms.is_empty() {
        let (ca, cb) = (candidates(a), candidates(b));
        return ca.iter().any(|x| cb.iter().any(|y| values_equal(x, y)));
    }
    if syms.len() > 8 {
        return false;
    }
    let mut valid = 0;
    for (k, base) in SAMPLES.iter().enumerate() {
        let env: Vec<(String, f64)> = syms
            .iter()
            .enumerate()
            .map(|(i, s)| (s.clone(), base + 0.41 * i as f64 * (1.0 + k as f64 * 0.1)))
            .collect();
        let (x, y) = (eval_at(a, &env), eval_at(b, &env));
        match (x.is_nan(), y.is_nan()) {
            (true, true) => continue,
            (true, false) | (false, true) => return false,
            _ => {}
        }
        if !x.is_finite() || !y.is_finite() {
            if x != y {
                return false;
            }
            continue;
        }
        if (x - y).abs() > 1e-8 * x.abs().max(y.abs()).max(1.0) {
            return false;
        }
        valid += 1;
    }
    valid >= 2
}

/// Elements of a node read as a collection (for set comparisons).
fn elements(n: &Node) -> Option<&[Node]> {
    match n {
        Node::Set(v) | Node::Tuple(v) => Some(v),
        _ => None,
    }
}

fn set_equal(a: &[Node], b: &[Node], depth: usize) -> bool {
    a.iter()
        .all(|x| b.iter().any(|y| equivalent_at(x, y, depth)))
        && b.iter()
            .all(|y| a.iter().any(|x| equivalent_at(x, y, depth)))
}

/// Is `pred` mathematically equivalent to `gold`?
pub fn equivalent(gold: &Node, pred: &Node) -> bool {
    equivalent_at(gold, pred, 0)
}

fn equivalent_at(a: &Node, b: &Node, depth: usize) -> bool {
    if depth > 16 {
        return false;
    }
    let d = depth + 1;
    match (a, b) {
        (Node::Rel(oa, la, ra), Node::Rel(ob, lb, rb)) => {
            (oa == ob && equivalent_at(la, lb, d) && equivalent_at(ra, rb, d))
                || (*oa == ob.flipped() && equivalent_at(la, rb, d) && equivalent_at(ra, lb, d))
        }
        (Node::Rel(RelOp::Eq, l, r), other) | (other, Node::Rel(RelOp::Eq, l, r)) => {
            is_name(l) && equivalent_at(r, other, d)
        }
        // A gold inequality in one variable matches the interval it describes (math-verify
        // converts the gold side only: `x \ge 5` = `[5, \infty)`, but not the other way round).
        (Node::Rel(op, l, r), iv @ (Node::Interval { .. } | Node::Tuple(_))) if depth == 0 => {
            relation_interval(*op, l, r).is_some_and(|ri| equivalent_at(&ri, iv, d))
        }
        (Node::Rel(..), _) | (_, Node::Rel(..)) => false,
        (Node::Text(x), Node::Text(y)) => x == y,
        (Node::Text(_), _) | (_, Node::Text(_)) => false,
        (Node::Set(x), other) | (other, Node::Set(x)) => match elements(other) {
            Some(y) => set_equal(x, y, d),
            // `\{3\}` = `3`
            None => x.len() == 1 && equivalent_at(&x[0], other, d),
        },
        (Node::Matrix(x), Node::Matrix(y)) => {
            x.len() == y.len()
                && x.iter().zip(y).all(|(rx, ry)| {
                    rx.len() == ry.len() && rx.iter().zip(ry).all(|(p, q)| equivalent_at(p, q, d))
                })
        }
        (Node::Matrix(_), _) | (_, Node::Matrix(_)) => false,
        (Node::Tuple(x), Node::Tuple(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| equivalent_at(p, q, d))
        }
        (
            Node::Tuple(t),
            Node::Interval {
                lo,
                hi,
                lo_closed: false,
                hi_closed: false,
            },
        )
        | (
            Node::Interval {
                lo,
                hi,
                lo_closed: false,
                hi_closed: false,
            },
            Node::Tuple(t),
        ) => t.len() == 2 && equivalent_at(&t[0], lo, d) && equivalent_at(&t[1], hi, d),
        (
            Node::Interval {
                lo: l1,
                hi: h1,
                lo_closed: a1,
                hi_closed: b1,
            },
            Node::Interval {
                lo: l2,
                hi: h2,
                lo_closed: a2,
                hi_closed: b2,
            },
        ) => a1 == a2 && b1 == b2 && equivalent_at(l1, l2, d) && equivalent_at(h1, h2, d),
        (Node::Union(x), Node::Union(y)) => set_equal(x, y, d),
        (Node::Tuple(_) | Node::Interval { .. } | Node::Union(_), _)
        | (_, Node::Tuple(_) | Node::Interval { .. } | Node::Union(_)) => false,
        _ => scalar_equal(a, b),
    }
}

/// `x`, or a function name applied to a variable (`f(x)`, parsed as the product `f·x`).
fn is_name(n: &Node) -> bool {
    match n {
        Node::Sym(_) => true,
        Node::Mul(v) => v.len() <= 3 && v.iter().all(|f| matches!(f, Node::Sym(_))),
        _ => false,
    }
}

/// The interval a one-variable inequality describes (`x \ge 5` → `[5, ∞)`).
fn relation_interval(op: RelOp, l: &Node, r: &Node) -> Option<Node> {
    let (op, bound) = match (l, r) {
        (Node::Sym(_), b) => (op, b),
        (b, Node::Sym(_)) => (op.flipped(), b),
        _ => return None,
    };
    let inf = || Box::new(Node::Inf);
    let neg_inf = || Box::new(Node::Neg(Box::new(Node::Inf)));
    let b = || Box::new(bound.clone());
    Some(match op {
        RelOp::Ge => Node::Interval {
            lo: b(),
            hi: inf(),
            lo_closed: true,
            hi_closed: false,
        },
        RelOp::Gt => Node::Interval {
            lo: b(),
            hi: inf(),
            lo_closed: false,
            hi_closed: false,
        },
        RelOp::Le => Node::Interval {
            lo: neg_inf(),
            hi: b(),
            lo_closed: false,
            hi_closed: true,
        },
        RelOp::Lt => Node::Interval {
            lo: neg_inf(),
            hi: b(),
            lo_closed: false,
            hi_closed: false,
        },
        _ => return None,
    })
}
