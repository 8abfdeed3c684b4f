//! Turning one row of logits into one token: temperature, top-k, top-p, min-p, and the
//! log-probability recorded for training.
//!
//! Everything here is host code over a `&[f32]` row, so it is exact, testable on hand-made
//! rows, and the same whatever backend produced the logits.

use serde::{Deserialize, Serialize};

/// How completions are sampled. Defaults: temperature 1, no truncation, 256 new tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingParams {
    /// Logits are divided by this before sampling; 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches p (1 = off).
    pub top_p: f32,
    /// Keep tokens whose probability is at least `min_p` times the most likely one's (0 = off).
    pub min_p: f32,
    /// Completion length limit; a completion that reaches it finishes with `length`.
    pub max_new_tokens: usize,
    /// Token ids that end a completion (added to the model's own eos ids).
    pub stop_token_ids: Vec<u32>,
    /// Strings that end a completion once its decoded text contains one (needs a detokenizer).
    /// The completion keeps the token that completed the string, and its text keeps the string:
    /// R1-style rewards look for the closing tag.
    pub stop_strings: Vec<String>,
    /// Never stop on eos or stop ids: every completion runs to `max_new_tokens` (benchmarks).
    pub ignore_eos: bool,
    /// Base seed; each (prompt key, sample index) gets its own stream derived from it.
    pub seed: u64,
    /// Rollout engines working at once, each on its own thread and its own contiguous share
    /// of the prompts (vLLM's data parallelism, on CPU threads). The CPU backend runs each op
    /// on its calling thread, so this is how a rollout uses a second core. Results depend on
    /// this value (each shard pads to its own longest prompt, which moves float sums in the last
    /// bits) but not on the machine.
    /// Not read from a `[rollout]` table: a run sets it from `run.data_parallel_size`.
    #[serde(skip)]
    pub data_parallel_size: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            max_new_tokens: 256,
            stop_token_ids: vec![],
            stop_strings: vec![],
            ignore_eos: false,
            seed: 0,
            data_parallel_size: 1,
        }
    }
}

impl SamplingParams {
    /// Check ranges; the error names the field and what was expected.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "temperature must be a finite number ≥ 0, found {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], found {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p must be in [0, 1], found {}", self.min_p));
        }
        if self.max_new_tokens == 0 {
            return Err("max_new_tokens must be at least 1".into());
        }
        if self.data_parallel_size == 0 {
            return Err("data_parallel_size must be at least 1".into());
        }
        Ok(())
    }
}

/// `log_softmax(logits / t)` evaluated at `token`, in f64 for accuracy, returned as f32.
/// With `t = 0` (greedy) the untempered distribution (`t = 1`) is used.
pub fn token_logprob(logits: &[f32], temperature: f32, token: u32) -> f32 {
    let t = if temperature > 0.0 {
        temperature as f64
    } else {
        1.0
    };
    let max = row_max(logits);
    let lse = logits
        .iter()
        .map(|&x| ((x as f64 - max) / t).exp())
        .sum::<f64>()
        .ln();
    logprob_from_lse(logits, max, t, lse, token)
}

fn row_max(logits: &[f32]) -> f64 {
    logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64
}

fn logprob_from_lse(logits: &[f32], max: f64, t: f64, lse: f64, token: u32) -> f32 {
    ((logits[token as usize] as f64 - max) / t - lse) as f32
}

/// Index of the largest logit; ties go to the lowest index.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Sample one token from a row of logits with the uniform draw `u ∈ [0, 1)`.
///
/// Order of operations, as transformers' logits warpers apply them: temperature → top-k →
/// top-p → min-p, each on the distribution the previous one left (renormalised). Candidates
/// are ordered by probability (ties by lower id) and `u` is inverted through their cumulative
/// distribution, so the result is a pure function of `(logits, params, u)`.
///
/// Returns the token and its log-probability under `softmax(logits / temperature)`: the
/// policy's distribution after temperature and before any truncation, which is what training
/// recomputes (see the crate docs).
pub fn sample(logits: &[f32], params: &SamplingParams, u: f64) -> (u32, f32) {
    // Greedy (temperature 0) and truncated sampling go straight to the reference.
    let untruncated = params.temperature > 0.0
        && (params.top_k == 0 || params.top_k >= logits.len())
        && params.top_p >= 1.0
        && params.min_p <= 0.0;
    if !untruncated {
        return sample_reference(logits, params, u);
    }
    let w = Weights::new(logits, params.temperature);
    w.most_likely(logits, u)
        .unwrap_or_else(|| w.invert_sorted(logits, u))
}

/// One untruncated row's `exp((x − max) / t)` per token, their sum in index order (the
/// normaliser `token_logprob` computes, to the bit) and the most likely token (lowest id on
/// ties). Computed once, used by the fast path and, when it declines, by the sorted inversion.
struct Weights {
    max: f64,
    t: f64,
    e: Vec<f64>,
    total: f64,
    best: usize,
}

impl Weights {
    fn new(logits: &[f32], temperature: f32) -> Self {
        let t = temperature as f64;
        let max = row_max(logits);
        let e: Vec<f64> = logits
            .iter()
            .map(|&x| ((x as f64 - max) / t).exp())
            .collect();
        let (mut total, mut best) = (0.0f64, 0usize);
        for (i, &ei) in e.iter().enumerate() {
            total += ei;
            // Strict: ties go to the lowest index, as in the reference's order.
            if ei > e[best] {
                best = i;
            }
        }
        Weights {
            max,
            t,
            e,
            total,
            best,
        }
    }

    fn logprob(&self, logits: &[f32], token: u32) -> f32 {
        logprob_from_lse(logits, self.max, self.t, self.total.ln(), token)
    }

    /// The fast path of [`sample`] for an untruncated distribution: the most likely token, when
    /// `u` falls inside its share of the CDF with a margin no summation order can cross. A trained policy is confident (entropy
    /// well under one nat), so this is most draws; the rest return `None` and go through the sort.
    ///
    /// Exactness: the reference sums the candidates in sorted order, this in index order. Both are
    /// sums of the same `n` positive terms, so they differ by at most `2(n−1)·ε·total`; the test
    /// `target < first` is only trusted when it holds for `total` enlarged by twice that bound.
    fn most_likely(&self, logits: &[f32], u: f64) -> Option<(u32, f32)> {
        let bound = self.total + 4.0 * self.e.len() as f64 * f64::EPSILON * self.total;
        // `total` is summed in index order, exactly as `token_logprob` sums it.
        (u * bound < self.e[self.best])
            .then(|| (self.best as u32, self.logprob(logits, self.best as u32)))
    }

    /// [`sample_reference`] for an untruncated row, from the weights already computed: the
    /// same candidates, order, sums and inversion, so the same bits.
    fn invert_sorted(&self, logits: &[f32], u: f64) -> (u32, f32) {
        let cand = sorted_by_key(&self.e);
        let tok = invert_cdf(&cand, u);
        (tok, self.logprob(logits, tok))
    }
}

/// `(id, e[id])` in [`sort_candidates`]' order, sorted as plain integers: each candidate is one
/// `u128`, its weight's `total_cmp` key (inverted: most likely first) above its id (lower id
/// first on ties). Integer compares without a closure sort 512 candidates about twice as fast,
/// and the order is the same: the key is `total_cmp`'s own, and ids are distinct.
fn sorted_by_key(e: &[f64]) -> Vec<(u32, f64)> {
    let mut keys: Vec<u128> = e
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            // `f64::total_cmp`'s transform: a signed integer that orders as the floats do.
            let bits = x.to_bits() as i64;
            let ordered = bits ^ ((((bits >> 63) as u64) >> 1) as i64);
            // Unsigned, then inverted so that the largest weight comes first.
            let descending = !((ordered as u64) ^ (1 << 63));
            (u128::from(descending) << 32) | i as u128
        })
        .collect();
    keys.sort_unstable();
    keys.iter()
        .map(|&k| {
            let id = k as u32;
            (id, e[id as usize])
        })
        .collect()
}

/// Most likely first, ties by lower id. Token ids are distinct, so the order is total: no two
/// candidates compare equal, and the unstable sort (no scratch buffer) gives exactly the stable
/// sort's order.
fn sort_candidates(cand: &mut [(u32, f64)]) {
    cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
}

/// The token where the cumulative weight of `kept` (in its order) first exceeds `u` times its
/// total; the last one if rounding leaves `u · total` at or past the end.
fn invert_cdf(kept: &[(u32, f64)], u: f64) -> u32 {
    let total: f64 = kept.iter().map(|c| c.1).sum();
    let target = u * total;
    let mut acc = 0.0;
    for c in kept {
        acc += c.1;
        if target < acc {
            return c.0;
        }
    }
    kept[kept.len() - 1].0
}

/// [`sample`] by its definition: sort every candidate, truncate, invert the CDF. The
/// reference the fast path is tested against, and the path for truncated sampling.
pub fn sample_reference(logits: &[f32], params: &SamplingParams, u: f64) -> (u32, f32) {
    if params.temperature <= 0.0 {
        let tok = argmax(logits);
        return (tok, token_logprob(logits, 0.0, tok));
    }
    let t = params.temperature as f64;
    let max = row_max(logits);
    let mut cand: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &x)| (i as u32, ((x as f64 - max) / t).exp()))
        .collect();
    sort_candidates(&mut cand);
    let mut keep = cand.len();
    if params.top_k > 0 {
        keep = keep.min(params.top_k);
    }
    if params.top_p < 1.0 {
        let total: f64 = cand[..keep].iter().map(|c| c.1).sum();
        let mut acc = 0.0;
        for (i, c) in cand[..keep].iter().enumerate() {
            acc += c.1 / total;
            if acc >= params.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
    }
    if params.min_p > 0.0 {
        // Relative to the most likely token, so renormalisation does not change the cut.
        let threshold = params.min_p as f64 * cand[0].1;
        keep = cand[..keep]
            .iter()
            .take_while(|c| c.1 >= threshold)
            .count()
            .max(1);
    }
    let tok = invert_cdf(&cand[..keep], u);
    (tok, token_logprob(logits, params.temperature, tok))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(t: f32) -> SamplingParams {
        SamplingParams {
            temperature: t,
            ..Default::default()
        }
    }

    #[test]
    fn greedy_takes_the_lowest_index_among_ties() {
        assert_eq!(sample(&[0.5, 2.0, 2.0, -1.0], &params(0.0), 0.99).0, 1);
    }

    #[test]
    fn logprob_is_log_softmax_after_temperature() {
        let logits = [1.0f32, 2.0, 3.0];
        // softmax([0.5, 1, 1.5]) at index 2 = e^1.5 / (e^.5 + e^1 + e^1.5)
        let want = (1.5f64.exp() / (0.5f64.exp() + 1.0f64.exp() + 1.5f64.exp())).ln() as f32;
        assert!((token_logprob(&logits, 2.0, 2) - want).abs() < 1e-6);
        // Greedy reports the untempered distribution.
        let want1 = (3.0f64.exp() / (1.0f64.exp() + 2.0f64.exp() + 3.0f64.exp())).ln() as f32;
        assert!((sample(&logits, &params(0.0), 0.0).1 - want1).abs() < 1e-6);
    }

    #[test]
    fn inverse_cdf_over_sorted_candidates() {
        // probs with t = 1: ln([0.5, 0.3, 0.2]) → sorted order 0, 1, 2.
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        let p = params(1.0);
        assert_eq!(sample(&logits, &p, 0.0).0, 0);
        assert_eq!(sample(&logits, &p, 0.49).0, 0);
        assert_eq!(sample(&logits, &p, 0.51).0, 1);
        assert_eq!(sample(&logits, &p, 0.79).0, 1);
        assert_eq!(sample(&logits, &p, 0.81).0, 2);
        assert_eq!(sample(&logits, &p, 0.999_999).0, 2);
    }

    #[test]
    fn top_k_top_p_and_min_p_truncate() {
        let logits = [0.4f32.ln(), 0.3f32.ln(), 0.2f32.ln(), 0.1f32.ln()];
        // top-k 2 keeps {0: .4, 1: .3} → renormalised .571/.429; u = .6 → token 1, never 2.
        let p = SamplingParams {
            top_k: 2,
            ..params(1.0)
        };
        assert_eq!(sample(&logits, &p, 0.6).0, 1);
        assert_eq!(sample(&logits, &p, 0.999).0, 1);
        // top-p 0.65: 0.4 < 0.65 ≤ 0.7 → keeps 2 tokens.
        let p = SamplingParams {
            top_p: 0.65,
            ..params(1.0)
        };
        assert_eq!(sample(&logits, &p, 0.999).0, 1);
        // top-p 0.75 keeps 3.
        let p = SamplingParams {
            top_p: 0.75,
            ..params(1.0)
        };
        assert_eq!(sample(&logits, &p, 0.999).0, 2);
        // min-p 0.45: keep p ≥ 0.18 → tokens 0, 1, 2.
        let p = SamplingParams {
            min_p: 0.45,
            ..params(1.0)
        };
        assert_eq!(sample(&logits, &p, 0.999).0, 2);
        // min-p 0.8: keep p ≥ 0.32 → token 0 only.
        let p = SamplingParams {
            min_p: 0.8,
            ..params(1.0)
        };
        assert_eq!(sample(&logits, &p, 0.999).0, 0);
        // The recorded logprob ignores truncation: it is the full distribution's.
        assert!((sample(&logits, &p, 0.999).1 - 0.4f32.ln()).abs() < 1e-6);
    }

    #[test]
    fn fast_path_agrees_with_the_reference_bit_for_bit() {
        use rand_chacha::ChaCha8Rng;
        use rand_chacha::rand_core::{Rng, SeedableRng};
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut unit = move || (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let (mut fast_hits, mut draws) = (0, 0);
        for row in 0..400 {
            let n = [2, 3, 299, 512][row % 4];
            // Confident rows (one logit far ahead), flat rows, and rows with tied maxima.
            let spread = [0.5, 3.0, 12.0][row % 3];
            let mut logits: Vec<f32> = (0..n).map(|_| (unit() * spread) as f32).collect();
            let lead = (unit() * n as f64) as usize % n;
            logits[lead] += [0.0, 4.0, 15.0][(row / 3) % 3];
            if row % 5 == 0 {
                let other = (lead + 1) % n;
                logits[other] = logits[lead];
            }
            let t = [1.0f32, 0.7, 1.3][row % 3];
            let p = params(t);
            // The most likely token's share of the CDF, and u right at its edge.
            let max = row_max(&logits);
            let e: Vec<f64> = logits
                .iter()
                .map(|&x| ((x as f64 - max) / t as f64).exp())
                .collect();
            let share = 1.0 / e.iter().sum::<f64>();
            let edge = [share, share - 1e-15, share + 1e-15, share * (1.0 - 1e-13)];
            for u in (0..8)
                .map(|_| unit())
                .chain(edge.into_iter().filter(|u| (0.0..1.0).contains(u)))
            {
                draws += 1;
                let want = sample_reference(&logits, &p, u);
                let got = sample(&logits, &p, u);
                assert_eq!(got.0, want.0, "row {row} u {u}");
                assert_eq!(got.1.to_bits(), want.1.to_bits(), "row {row} u {u}");
                if Weights::new(&logits, t).most_likely(&logits, u).is_some() {
                    fast_hits += 1;
                }
            }
        }
        // Both paths were exercised.
        assert!(
            fast_hits > draws / 5 && fast_hits < draws,
            "{fast_hits} of {draws}"
        );
    }

    /// The keyed sort against the comparator on weights with ties, zeros, infinities and NaNs
    /// of both signs.
    #[test]
    fn keyed_sort_orders_as_the_comparator() {
        let specials = [
            0.0,
            -0.0,
            1.0,
            1.0,
            f64::INFINITY,
            f64::NAN,
            -f64::NAN,
            1e-300,
            0.5,
        ];
        for n in [1, 9, 40, 512] {
            let e: Vec<f64> = (0..n)
                .map(|i| match i % 4 {
                    0 => specials[(i / 4) % specials.len()],
                    _ => ((i * 7919 % 97) as f64 / 97.0).powi(3),
                })
                .collect();
            let mut want: Vec<(u32, f64)> =
                e.iter().enumerate().map(|(i, &x)| (i as u32, x)).collect();
            sort_candidates(&mut want);
            let got = sorted_by_key(&e);
            let ids = |v: &[(u32, f64)]| v.iter().map(|c| c.0).collect::<Vec<_>>();
            assert_eq!(ids(&got), ids(&want), "{n} candidates");
        }
    }

    #[test]
    fn validate_names_the_field() {
        let bad = SamplingParams {
            top_p: 0.0,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().contains("top_p"));
        let bad = SamplingParams {
            temperature: -1.0,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().contains("temperature"));
        assert!(SamplingParams::default().validate().is_ok());
    }
}
