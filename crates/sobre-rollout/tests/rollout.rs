//! The rollout engine's exactness guarantees.

use std::path::Path;

use sobre_model::{
    ForwardOptions, Kernels, ModelConfig, MoeModel, default_device, init_model, load_model,
};
use sobre_rollout::{
    Completion, Detokenizer, EngineKernels, EngineMode, FinishReason, Prompt, SamplingParams,
    ScoredBatch, completion_logprobs, generate, generate_with,
};

fn test_model(seed: u64) -> MoeModel {
    let mut c = ModelConfig::preset("tiny").unwrap();
    c.initializer_range = 0.25;
    init_model(&c, seed, &default_device())
}

fn prompt(ids: &[u32], key: u64) -> Prompt {
    Prompt {
        ids: ids.to_vec(),
        key,
    }
}

fn sampled(t: f32, n: usize, seed: u64) -> SamplingParams {
    SamplingParams {
        temperature: t,
        max_new_tokens: n,
        seed,
        ..Default::default()
    }
}

fn assert_same(a: &Completion, b: &Completion, tol: f32) {
    assert_eq!(a.tokens, b.tokens, "tokens differ");
    for (x, y) in a.logprobs.iter().zip(&b.logprobs) {
        assert!((x - y).abs() <= tol, "logprob {x} vs {y}");
    }
    assert_eq!(a.finish_reason, b.finish_reason);
}

#[test]
fn greedy_reproduces_transformers_generate() {
    for name in ["qwen3_moe_tiny", "qwen2_moe_tiny"] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../sobre-model/tests/fixtures")
            .join(name);
        let model = load_model(&dir, &default_device()).unwrap();
        let reference: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
                .unwrap();
        let cases = reference["cases"].as_array().unwrap();
        let prompts: Vec<Prompt> = cases
            .iter()
            .enumerate()
            .map(|(i, c)| {
                prompt(
                    &c["ids"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_u64().unwrap() as u32)
                        .collect::<Vec<_>>(),
                    i as u64,
                )
            })
            .collect();
        // All prompts in one batch (different lengths), greedy.
        let out = generate(&model, &prompts, 1, &sampled(0.0, 12, 0), None).unwrap();
        for (c, case) in out.iter().zip(cases) {
            let want: Vec<u32> = case["greedy"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(
                c.tokens, want,
                "{name}: greedy continuation of prompt {}",
                c.prompt_index
            );
            assert_eq!(c.finish_reason, FinishReason::Length);
        }
    }
}

#[test]
fn a_completion_alone_equals_the_same_completion_in_a_mixed_batch() {
    let m = test_model(1);
    let params = sampled(1.0, 10, 7);
    let a = prompt(&[5, 9, 2], 42);
    let alone = generate(&m, std::slice::from_ref(&a), 3, &params, None).unwrap();
    let mixed = generate(
        &m,
        &[prompt(&[1, 2, 3, 4, 5, 6, 7, 8], 1), a, prompt(&[60], 2)],
        3,
        &params,
        None,
    )
    .unwrap();
    let in_batch: Vec<&Completion> = mixed.iter().filter(|c| c.prompt_index == 1).collect();
    assert_eq!(in_batch.len(), 3);
    for (x, y) in alone.iter().zip(in_batch) {
        assert_eq!(x.sample_index, y.sample_index);
        assert_same(x, y, 1e-5);
    }
    // The group's samples differ from each other (they are not copies).
    assert!(alone[0].tokens != alone[1].tokens || alone[1].tokens != alone[2].tokens);
}

#[test]
fn rollout_logprobs_equal_the_training_forward() {
    let m = test_model(2);
    let prompts = vec![prompt(&[3, 4, 5, 6, 7], 0), prompt(&[10, 11], 1)];
    for t in [1.0f32, 0.7] {
        let out = generate(&m, &prompts, 2, &sampled(t, 9, 3), None).unwrap();
        let pairs: Vec<(&[u32], &[u32])> = out
            .iter()
            .map(|c| (prompts[c.prompt_index].ids.as_slice(), c.tokens.as_slice()))
            .collect();
        let scored = ScoredBatch::new(&pairs, 0);
        let (lp, _) = completion_logprobs(&m, &scored, t, ForwardOptions::default());
        let lp: Vec<f32> = lp.try_into_vec_as::<f32>().unwrap();
        let width = scored.max_completion;
        for (r, c) in out.iter().enumerate() {
            for (i, &x) in c.logprobs.iter().enumerate() {
                let y = lp[r * width + i];
                assert!(
                    (x - y).abs() < 1e-4,
                    "t={t} row {r} token {i}: rollout {x} vs training {y}"
                );
            }
        }
    }
}

/// The frozen reference's log-probs on the host engine equal the tensor forward's (reference
/// kernels), in the shared-prompt layout and the whole-row one, tempered, with padding.
#[test]
fn host_logprobs_equal_tensor_logprobs() {
    use sobre_rollout::{completion_logprobs_host, completion_scores};
    let m = test_model(5);
    let host = sobre_model::InferenceModel::new(&m);
    let (p1, p2): (&[u32], &[u32]) = (&[3, 4, 5, 6, 7], &[9]);
    let comps: [&[u32]; 5] = [&[1, 2, 3], &[4], &[], &[5, 6, 7, 8], &[10, 11]];
    let pairs: Vec<(&[u32], &[u32])> = [p1, p1, p1, p2, p2].into_iter().zip(comps).collect();
    for share in [true, false] {
        let layout = ScoredBatch::with_prefix_sharing(&pairs, 0, share);
        let opts = ForwardOptions {
            kernels: Kernels::Reference,
            ..Default::default()
        };
        let want = completion_scores(&m, &layout, 0.7, opts, false)
            .logp
            .try_into_vec_as::<f32>()
            .unwrap();
        let got = completion_logprobs_host(&host, &layout, 0.7);
        assert_eq!(got.len(), 5 * 4);
        assert!(want.iter().filter(|&&x| x != 0.0).count() == 10);
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5,
                "share={share} position {i}: {a} vs {b}"
            );
        }
    }
}

#[test]
fn shared_prefixes_score_like_whole_rows() {
    use burn::prelude::*;
    use sobre_model::model::Ffn;
    use sobre_rollout::completion_scores;
    // Groups of repeated prompts of different lengths (one of a single token, whose prefix is
    // empty), completions of different lengths (one empty); scored with the balance loss.
    let mut c = ModelConfig::preset("tiny").unwrap();
    c.initializer_range = 0.25;
    let m = init_model(&c, 4, &default_device().autodiff());
    let (p1, p2, p3): (&[u32], &[u32], &[u32]) = (&[3, 4, 5, 6, 7], &[10, 11], &[9]);
    let comps: [&[u32]; 7] = [
        &[1, 2, 3],
        &[4],
        &[5, 6, 7, 8],
        &[],
        &[9, 10],
        &[11, 12],
        &[13],
    ];
    let prompts = [p1, p1, p1, p2, p2, p3, p3];
    let pairs: Vec<(&[u32], &[u32])> = prompts.iter().copied().zip(comps).collect();
    let opts = ForwardOptions {
        aux_loss: true,
        ..Default::default()
    };
    let run = |share: bool| {
        let layout = ScoredBatch::with_prefix_sharing(&pairs, 0, share);
        assert_eq!(layout.shares_prefixes(), share);
        let s = completion_scores(&m, &layout, 0.8, opts, true);
        let cot = Tensor::<2>::from_data(
            TensorData::new(
                (0..7 * 4)
                    .map(|i| ((i * 37 % 11) as f32 - 5.0) / 5.0)
                    .collect(),
                [7, 4],
            ),
            &m.device(),
        );
        let aux = s.router.aux_loss.clone().unwrap();
        let grads = ((s.logp.clone() * cot).sum() + aux.clone()).backward();
        let Ffn::Sparse(moe) = &m.layers[0].mlp else {
            unreachable!()
        };
        let host = |t: Tensor<2>| t.try_into_vec_as::<f32>().unwrap();
        let grads = vec![
            host(m.embed_tokens.val().grad(&grads).unwrap()),
            host(
                m.layers[1]
                    .self_attn
                    .k_proj
                    .weight
                    .val()
                    .grad(&grads)
                    .unwrap(),
            ),
            host(moe.router.val().grad(&grads).unwrap()),
        ];
        (
            host(s.logp),
            s.entropy,
            aux.into_scalar::<f32>(),
            s.router.expert_counts,
            grads,
        )
    };
    let (lp_s, ent_s, aux_s, counts_s, grads_s) = run(true);
    let (lp_w, ent_w, aux_w, counts_w, grads_w) = run(false);
    let max_diff = |a: &[f32], b: &[f32]| {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max)
    };
    assert!(lp_s.iter().any(|&x| x < -0.1), "logprobs are not trivial");
    assert!(max_diff(&lp_s, &lp_w) < 1e-5, "logprobs differ");
    assert!(max_diff(&ent_s, &ent_w) < 1e-5, "entropies differ");
    assert!(
        (aux_s - aux_w).abs() < 1e-6 * aux_w.abs().max(1.0),
        "{aux_s} vs {aux_w}"
    );
    assert_eq!(
        counts_s, counts_w,
        "a shared prefix counts once per row that uses it"
    );
    for (i, (a, b)) in grads_s.iter().zip(&grads_w).enumerate() {
        let scale = b.iter().fold(1e-6f32, |s, x| s.max(x.abs()));
        assert!(max_diff(a, b) <= 1e-4 * scale, "gradient {i} differs");
    }
}

#[test]
fn shared_prefill_separate_prefill_and_no_cache_agree() {
    let m = test_model(3);
    let prompts = vec![prompt(&[1, 2, 3], 0), prompt(&[9, 8, 7, 6, 5, 4], 1)];
    let params = SamplingParams {
        top_k: 20,
        top_p: 0.9,
        ..sampled(0.9, 8, 11)
    };
    let run = |mode, kernels| generate_with(&m, &prompts, 4, &params, None, mode, kernels).unwrap();
    let host = EngineKernels::Host;
    let shared = run(EngineMode::SharedPrefill, host);
    let separate = run(EngineMode::SeparatePrefill, host);
    let slow = run(EngineMode::NoCache, host);
    assert_eq!(shared.len(), 8);
    for ((a, b), c) in shared.iter().zip(&separate).zip(&slow) {
        assert_same(a, b, 1e-5);
        assert_same(a, c, 1e-5);
    }
}

/// The host inference engine (the default on the CPU) samples what burn tensor ops with the
/// reference kernels sample: same tokens, log-probs to 1e-5, for prompts of unequal length,
/// sequences that stop early (eos) and a group's shared prefill.
#[test]
fn host_engine_samples_what_tensor_ops_sample() {
    let m = test_model(8);
    let prompts = vec![
        prompt(&[1, 2, 3], 0),
        prompt(&[9, 8, 7, 6, 5, 4, 3], 1),
        prompt(&[60], 2),
    ];
    let params = SamplingParams {
        stop_token_ids: vec![5, 17],
        ..sampled(1.0, 12, 4)
    };
    let run = |mode, kernels| generate_with(&m, &prompts, 3, &params, None, mode, kernels).unwrap();
    let reference = EngineKernels::Tensor(Kernels::Reference);
    for mode in [EngineMode::SharedPrefill, EngineMode::NoCache] {
        let host = run(mode, EngineKernels::Host);
        let tensor = run(mode, reference);
        assert_eq!(host.len(), 9);
        assert!(
            host.iter().any(|c| c.finish_reason == FinishReason::Stop)
                && host.iter().any(|c| c.finish_reason == FinishReason::Length),
            "the case covers early stops and full lengths"
        );
        for (a, b) in host.iter().zip(&tensor) {
            assert_same(a, b, 1e-5);
        }
    }
}

/// Data-parallel shards against the one-engine reference: same completions, same order, with
/// prompt indices counted over the whole batch; shards of unequal size (5 prompts, 2 and 3
/// shards) and more shards than prompts.
#[test]
fn data_parallel_shards_agree_with_one_engine() {
    let m = test_model(6);
    let prompts: Vec<Prompt> = [
        &[1u32, 2, 3][..],
        &[9, 8, 7, 6, 5, 4],
        &[60],
        &[11, 12, 13, 14],
        &[40, 41],
    ]
    .iter()
    .enumerate()
    .map(|(i, ids)| prompt(ids, 100 + i as u64))
    .collect();
    let one = generate(&m, &prompts, 3, &sampled(1.0, 10, 9), None).unwrap();
    assert_eq!(one.len(), 15);
    for n in [2, 3, 8] {
        let params = SamplingParams {
            data_parallel_size: n,
            ..sampled(1.0, 10, 9)
        };
        let sharded = generate(&m, &prompts, 3, &params, None).unwrap();
        assert_eq!(sharded.len(), one.len(), "{n} shards");
        for (a, b) in one.iter().zip(&sharded) {
            assert_eq!(
                (a.prompt_index, a.sample_index, a.prompt_tokens),
                (b.prompt_index, b.sample_index, b.prompt_tokens),
                "{n} shards"
            );
            assert_same(a, b, 1e-5);
        }
    }
    // A bad prompt in a later shard is reported with its index in the whole batch.
    let mut bad = prompts.clone();
    bad[4].ids = vec![];
    let params = SamplingParams {
        data_parallel_size: 2,
        ..sampled(1.0, 10, 9)
    };
    let err = generate(&m, &bad, 3, &params, None)
        .unwrap_err()
        .to_string();
    assert_eq!(err, "prompt 4 is empty");
    let zero = SamplingParams {
        data_parallel_size: 0,
        ..sampled(1.0, 10, 9)
    };
    let err = generate(&m, &prompts, 3, &zero, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("data_parallel_size must be at least 1"),
        "{err}"
    );
}

#[test]
fn seeds_decide_the_samples() {
    let m = test_model(4);
    let p = [prompt(&[7, 7, 7], 5)];
    let a = generate(&m, &p, 4, &sampled(1.0, 12, 1), None).unwrap();
    let b = generate(&m, &p, 4, &sampled(1.0, 12, 1), None).unwrap();
    let c = generate(&m, &p, 4, &sampled(1.0, 12, 2), None).unwrap();
    let toks = |v: &Vec<Completion>| v.iter().map(|c| c.tokens.clone()).collect::<Vec<_>>();
    assert_eq!(toks(&a), toks(&b));
    assert_ne!(toks(&a), toks(&c));
}

struct Letters;
impl Detokenizer for Letters {
    fn decode(&self, ids: &[u32]) -> String {
        ids.iter()
            .map(|&i| char::from(b'a' + (i % 26) as u8))
            .collect()
    }
}

#[test]
fn stop_tokens_stop_strings_and_length() {
    let m = test_model(5);
    let p = [prompt(&[1, 2, 3], 0)];
    let greedy = generate(&m, &p, 1, &sampled(0.0, 12, 0), None)
        .unwrap()
        .remove(0);
    // Stop on the 4th greedy token (its first occurrence).
    let stop = greedy.tokens[3];
    let first = greedy.tokens.iter().position(|&t| t == stop).unwrap();
    let params = SamplingParams {
        stop_token_ids: vec![stop],
        ..sampled(0.0, 12, 0)
    };
    let c = generate(&m, &p, 1, &params, None).unwrap().remove(0);
    assert_eq!(c.tokens, greedy.tokens[..=first].to_vec());
    assert_eq!(c.finish_reason, FinishReason::Stop);
    // ignore_eos runs to the limit.
    let params = SamplingParams {
        ignore_eos: true,
        ..params
    };
    let c = generate(&m, &p, 1, &params, None).unwrap().remove(0);
    assert_eq!(
        (c.tokens.len(), c.finish_reason),
        (12, FinishReason::Length)
    );
    // A stop string made of the 2nd and 3rd greedy tokens' letters.
    let text = Letters.decode(&greedy.tokens);
    let needle = text[1..3].to_string();
    let end = text.find(&needle).unwrap() + 2;
    let params = SamplingParams {
        stop_strings: vec![needle.clone()],
        ..sampled(0.0, 12, 0)
    };
    let c = generate(&m, &p, 1, &params, Some(&Letters))
        .unwrap()
        .remove(0);
    assert_eq!(c.tokens, greedy.tokens[..end].to_vec());
    assert!(c.text.unwrap().ends_with(&needle));
    // Stop strings without a detokenizer, and bad prompts, are refused.
    assert!(
        generate(&m, &p, 1, &params, None)
            .unwrap_err()
            .to_string()
            .contains("stop_strings need a tokenizer")
    );
    let err = generate(&m, &[prompt(&[1, 999], 0)], 1, &sampled(0.0, 2, 0), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("prompt 0 has token id 999"), "{err}");
}
