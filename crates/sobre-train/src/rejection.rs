//! Rejection sampling: `n` completions per prompt from a model, those whose rewards pass kept,
//! deduplicated and capped at `k` per prompt, written as an SFT dataset — DeepSeek-R1's stage 3
//! and the distillation data of its small models.
//!
//! Generation and scoring are [`crate::eval::evaluate`]'s (so "correct" means what it means in
//! every held-out table); the selection is [`select`], a pure function the tests check by hand.
//! The kept completions are written as JSONL in the layout `[data.sft_dataset]` reads by default
//! (the problem's fields, `prompt`, `answer`, `completion`): SFT on them is text-level, so the
//! student that trains on them may have another tokenizer than the model that wrote them.

use std::collections::HashSet;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sobre_data::{Sample, Template, Tokenizer};
use sobre_model::MoeModel;
use sobre_reward::CombinedReward;

use crate::TrainError;
use crate::eval::{EvalOptions, EvalSample, evaluate};

/// Which completions are kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Keep {
    /// `None`: the correct ones (the correctness reward scores ≥ 1, as in evaluation);
    /// `Some(t)`: those whose weighted total reward is ≥ `t`.
    pub threshold: Option<f64>,
    /// At most this many per prompt (≥ 1).
    pub k: usize,
    /// Keep the shortest passing completions (in tokens) rather than the first sampled.
    pub shortest: bool,
}

/// What a rejection-sampling pass did (`rejection.json` of a stage).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RejectionReport {
    pub prompts: usize,
    /// Completions sampled (prompts × n).
    pub sampled: usize,
    /// Completions that passed the filter, before deduplication and the cap.
    pub passed: usize,
    /// Identical completions of one prompt dropped.
    pub duplicates: usize,
    /// Completions kept (written).
    pub kept: usize,
    /// Prompts with at least one kept completion.
    pub prompts_kept: usize,
    pub seconds: f64,
}

impl RejectionReport {
    /// The one line a run prints: what was kept of what, and where it went.
    pub fn line(&self, out: &Path) -> String {
        format!(
            "kept {} of {} completions ({} passed, {} duplicates) for {} of {} problems → {}",
            self.kept,
            self.sampled,
            self.passed,
            self.duplicates,
            self.prompts_kept,
            self.prompts,
            out.display()
        )
    }
}

/// The kept completions of problem-major `samples` (as [`evaluate`] returns them) as SFT
/// samples: each problem's passing completions, identical texts once, the first `k` in sample
/// order — or the `k` shortest in tokens, ties by sample order, with `keep.shortest` — then
/// problem order. Also returns (passed, duplicates).
pub fn select(
    samples: &[EvalSample],
    problems: &[Sample],
    keep: &Keep,
) -> (Vec<Sample>, usize, usize) {
    let passes = |s: &EvalSample| match keep.threshold {
        None => s.correct,
        Some(t) => s.reward >= t,
    };
    let (mut out, mut passed, mut duplicates) = (Vec::new(), 0, 0);
    let mut start = 0;
    while start < samples.len() {
        let problem = samples[start].problem;
        let end = start
            + samples[start..]
                .iter()
                .take_while(|s| s.problem == problem)
                .count();
        let mut seen = HashSet::new();
        let mut kept: Vec<&EvalSample> = Vec::new();
        for s in samples[start..end].iter().filter(|s| passes(s)) {
            passed += 1;
            if seen.insert(s.completion.as_str()) {
                kept.push(s);
            } else {
                duplicates += 1;
            }
        }
        if keep.shortest {
            // Stable: equal lengths stay in sample order.
            kept.sort_by_key(|s| s.tokens);
        }
        kept.truncate(keep.k);
        let p = &problems[problem];
        out.extend(kept.into_iter().map(|s| Sample {
            completion: Some(s.completion.clone()),
            ..p.clone()
        }));
        start = end;
    }
    (out, passed, duplicates)
}

/// Sample `opts.samples` completions for each of `problems` with `model`, score them with
/// `rewards`, keep what [`select`] keeps.
pub fn rejection_sample(
    model: &MoeModel,
    tokenizer: &Tokenizer,
    problems: &[Sample],
    template: &Template,
    rewards: &CombinedReward,
    opts: &EvalOptions,
    keep: &Keep,
) -> Result<(Vec<Sample>, RejectionReport), TrainError> {
    if keep.k == 0 {
        return Err(TrainError::Data(
            "k (completions kept per prompt) must be at least 1".into(),
        ));
    }
    let out = evaluate(model, tokenizer, problems, template, rewards, opts)?;
    let (kept, passed, duplicates) = select(&out.samples, problems, keep);
    let prompts_kept = {
        let mut p: Vec<&sobre_data::Prompt> = kept.iter().map(|s| &s.prompt).collect();
        p.dedup();
        p.len()
    };
    let report = RejectionReport {
        prompts: problems.len(),
        sampled: out.samples.len(),
        passed,
        duplicates,
        kept: kept.len(),
        prompts_kept,
        seconds: out.report.seconds,
    };
    Ok((kept, report))
}

/// Write `samples` as JSONL to `path` through a temporary sibling renamed into place, so a
/// process killed while writing leaves either no file or the whole one (a stage is done when
/// its file exists).
pub fn write_atomically(samples: &[Sample], path: &Path) -> Result<(), TrainError> {
    let tmp = path.with_extension("jsonl.partial");
    sobre_data::dataset::write_jsonl(samples, &tmp)
        .map_err(|e| TrainError::Data(format!("writing {}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(|e| TrainError::io(path, e))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn problem(i: usize) -> Sample {
        Sample {
            prompt: sobre_data::Prompt::Text(format!("problem {i}")),
            answer: Some(i.to_string()),
            completion: None,
            fields: BTreeMap::new(),
        }
    }

    fn sample(
        problem: usize,
        sample: usize,
        text: &str,
        tokens: usize,
        correct: bool,
        reward: f64,
    ) -> EvalSample {
        EvalSample {
            problem,
            sample,
            prompt: String::new(),
            completion: text.into(),
            answer: None,
            tokens,
            finish_reason: "stop".into(),
            reward,
            rewards: BTreeMap::new(),
            correct,
            format: true,
        }
    }

    fn cases() -> (Vec<EvalSample>, Vec<Sample>) {
        let samples = vec![
            // Problem 0: three correct, one a duplicate of another; one wrong.
            sample(0, 0, "long right answer", 9, true, 1.1),
            sample(0, 1, "wrong", 2, false, 0.1),
            sample(0, 2, "short right", 4, true, 1.1),
            sample(0, 3, "long right answer", 9, true, 1.1),
            // Problem 1: nothing correct, one with a high partial reward.
            sample(1, 0, "close", 5, false, 0.6),
            sample(1, 1, "far", 5, false, 0.0),
            // Problem 2: two correct of equal length.
            sample(2, 0, "b", 3, true, 1.0),
            sample(2, 1, "a", 3, true, 1.0),
        ];
        (samples, (0..3).map(problem).collect())
    }

    fn texts(kept: &[Sample]) -> Vec<(String, String)> {
        kept.iter()
            .map(|s| {
                (
                    s.prompt.user_text().unwrap_or("").to_string(),
                    s.completion.clone().unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn keeps_exactly_the_passing_deduplicated_capped_completions() {
        let (samples, problems) = cases();
        let keep = Keep {
            threshold: None,
            k: 2,
            shortest: false,
        };
        let (kept, passed, dups) = select(&samples, &problems, &keep);
        assert_eq!((passed, dups), (5, 1));
        assert_eq!(
            texts(&kept),
            vec![
                ("problem 0".into(), "long right answer".into()),
                ("problem 0".into(), "short right".into()),
                ("problem 2".into(), "b".into()),
                ("problem 2".into(), "a".into()),
            ]
        );
        // The problem's own fields and answer come along; the completion is the sample's.
        assert_eq!(kept[0].answer.as_deref(), Some("0"));
    }

    #[test]
    fn shortest_first_with_ties_in_sample_order() {
        let (samples, problems) = cases();
        let keep = Keep {
            threshold: None,
            k: 1,
            shortest: true,
        };
        let (kept, _, _) = select(&samples, &problems, &keep);
        assert_eq!(
            texts(&kept),
            vec![
                ("problem 0".into(), "short right".into()),
                ("problem 2".into(), "b".into())
            ]
        );
    }

    #[test]
    fn a_reward_threshold_replaces_correctness() {
        let (samples, problems) = cases();
        let keep = Keep {
            threshold: Some(0.5),
            k: 8,
            shortest: false,
        };
        let (kept, passed, dups) = select(&samples, &problems, &keep);
        assert_eq!((passed, dups), (6, 1));
        assert_eq!(kept.len(), 5);
        assert_eq!(texts(&kept)[2], ("problem 1".into(), "close".into()));
        let keep = Keep {
            threshold: Some(1.05),
            k: 8,
            shortest: false,
        };
        assert_eq!(select(&samples, &problems, &keep).0.len(), 2);
    }

    #[test]
    fn the_written_file_reads_back_as_sft_demonstrations() {
        let (samples, problems) = cases();
        let keep = Keep {
            threshold: None,
            k: 1,
            shortest: true,
        };
        let (kept, _, _) = select(&samples, &problems, &keep);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sft.jsonl");
        write_atomically(&kept, &path).unwrap();
        assert!(!dir.path().join("sft.jsonl.partial").exists());
        let back = sobre_data::dataset::load(&sobre_data::DatasetConfig::new(&path))
            .unwrap()
            .samples;
        assert_eq!(back, kept);
    }
}
