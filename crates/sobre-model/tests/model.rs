//! Self-consistency of the model: cache vs full forward, dispatch vs dense reference, padding,
//! save/load, gradients, and the errors bad inputs must give.

use burn::module::Param;
use burn::prelude::*;
use sobre_model::model::Ffn;
use sobre_model::{
    Batch, ForwardOptions, Kernels, KvCache, LogitsMode, ModelConfig, ModelError, MoeImpl,
    MoeModel, default_device, init_model, load_model, save_model,
};

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.try_into_vec_as::<f32>().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The tiny preset with weights large enough that routing and attention are far from uniform.
fn test_config() -> ModelConfig {
    let mut c = ModelConfig::preset("tiny").unwrap();
    c.initializer_range = 0.3;
    c.num_experts = 6;
    c.num_experts_per_tok = 3;
    c.shared_expert_intermediate_size = 8;
    c.shared_expert_gate = true;
    c.mlp_only_layers = vec![1];
    c.num_hidden_layers = 3;
    c
}

fn model(cfg: &ModelConfig, seed: u64) -> MoeModel {
    init_model(cfg, seed, &default_device())
}

fn ids(n: usize, salt: u32, vocab: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i * 7 + salt * 13 + 3) % vocab as u32)
        .collect()
}

#[test]
fn cached_decode_equals_full_forward() {
    let cfg = test_config();
    let m = model(&cfg, 1);
    let seqs = vec![ids(11, 1, cfg.vocab_size), ids(6, 2, cfg.vocab_size)];
    // Full forward over the left-padded batch.
    let full = m.forward(
        &Batch::left_padded(&seqs, 0),
        None,
        ForwardOptions::default(),
    );
    let full = values(full.logits); // [2, 11, V]
    let v = cfg.vocab_size;
    // Prefill the first 5 columns, then decode the remaining 6 one column at a time.
    let batch = Batch::left_padded(&seqs, 0);
    let mut cache = KvCache::new(&cfg, 2, 11, &m.device());
    let cols = |lo: usize, hi: usize| {
        let pick = |x: &Vec<u32>| {
            (0..2)
                .flat_map(|r| x[r * 11 + lo..r * 11 + hi].to_vec())
                .collect::<Vec<_>>()
        };
        Batch {
            batch: 2,
            seq: hi - lo,
            input_ids: pick(&batch.input_ids),
            positions: pick(&batch.positions),
            attention_mask: (0..2)
                .flat_map(|r| batch.attention_mask[r * 11 + lo..r * 11 + hi].to_vec())
                .collect(),
        }
    };
    let mut got = vec![vec![]; 2];
    let out = values(
        m.forward(&cols(0, 5), Some(&mut cache), ForwardOptions::default())
            .logits,
    );
    for r in 0..2 {
        got[r].extend_from_slice(&out[r * 5 * v..(r + 1) * 5 * v]);
    }
    for c in 5..11 {
        let out = values(
            m.forward(&cols(c, c + 1), Some(&mut cache), ForwardOptions::default())
                .logits,
        );
        for r in 0..2 {
            got[r].extend_from_slice(&out[r * v..(r + 1) * v]);
        }
    }
    assert_eq!(cache.len(), 11);
    for r in 0..2 {
        let pad = 11 - seqs[r].len();
        // Compare only real positions: padding positions' outputs are never used.
        let want = &full[(r * 11 + pad) * v..(r + 1) * 11 * v];
        let d = max_diff(&got[r][pad * v..], want);
        assert!(
            d < 1e-5,
            "row {r}: cached decode differs from full forward by {d:e}"
        );
    }
}

#[test]
fn last_only_logits_equal_the_last_column() {
    let cfg = test_config();
    let m = model(&cfg, 2);
    let b = Batch::left_padded(&[ids(9, 3, cfg.vocab_size), ids(4, 4, cfg.vocab_size)], 0);
    let full = values(m.forward(&b, None, ForwardOptions::default()).logits);
    let last = values(
        m.forward(
            &b,
            None,
            ForwardOptions {
                logits: LogitsMode::Last,
                ..Default::default()
            },
        )
        .logits,
    );
    let v = cfg.vocab_size;
    for r in 0..2 {
        let d = max_diff(
            &last[r * v..(r + 1) * v],
            &full[(r * 9 + 8) * v..(r * 9 + 9) * v],
        );
        assert!(d < 1e-6, "row {r}: {d:e}");
    }
}

#[test]
fn logits_at_positions_equal_the_full_forward_there() {
    let cfg = test_config();
    let m = model(&cfg, 5);
    let b = Batch::right_padded(&[ids(9, 5, cfg.vocab_size), ids(5, 6, cfg.vocab_size)], 0);
    let full = values(m.forward(&b, None, ForwardOptions::default()).logits); // [2, 9, V]
    // Out of order, repeated, and in both rows (flat index = row · 9 + column).
    let positions = [12, 3, 0, 8, 13, 3];
    let (picked, _) = m.forward_positions(&b, &positions, ForwardOptions::default());
    assert_eq!(picked.dims(), [positions.len(), cfg.vocab_size]);
    let picked = values(picked);
    let v = cfg.vocab_size;
    for (i, &p) in positions.iter().enumerate() {
        let d = max_diff(&picked[i * v..(i + 1) * v], &full[p * v..(p + 1) * v]);
        assert!(d < 1e-6, "position {p}: {d:e}");
    }
}

/// Data-parallel shards of a batch, each given the batch's routing totals, have balance-loss
/// shares that add up to the batch's loss in one forward; each shard alone (its own totals)
/// does not, which is why replicas exchange totals.
#[test]
fn shards_balance_losses_add_up_to_the_batch_loss() {
    let cfg = test_config();
    let m = model(&cfg, 7);
    let seqs: Vec<Vec<u32>> = (0..4)
        .map(|i| ids(4 + 3 * i, 20 + i as u32, cfg.vocab_size))
        .collect();
    let opts = ForwardOptions {
        aux_loss: true,
        ..Default::default()
    };
    let whole = m.forward(&Batch::right_padded(&seqs, 0), None, opts).router;
    let whole_loss = values(whole.aux_loss.unwrap())[0];
    let shards: Vec<_> = [&seqs[..1], &seqs[1..]]
        .iter()
        .map(|part| {
            let r = m.forward(&Batch::right_padded(part, 0), None, opts).router;
            r.aux_parts.unwrap()
        })
        .collect();
    let mut totals = sobre_model::RouteTotals::default();
    for s in &shards {
        totals.add(&s.totals);
    }
    assert_eq!(totals.rows, whole.aux_parts.as_ref().unwrap().totals.rows);
    let summed: f32 = shards.iter().map(|s| values(s.loss_in(&totals))[0]).sum();
    assert!(
        (summed - whole_loss).abs() < 1e-5 && whole_loss > 0.5,
        "{summed} vs {whole_loss}"
    );
    let own: f32 = shards
        .iter()
        .map(|s| values(s.loss_in(&s.totals))[0] * (s.totals.rows / totals.rows) as f32)
        .sum();
    assert!((own - whole_loss).abs() > 1e-4, "{own} vs {whole_loss}");
}

#[test]
fn dispatch_equals_dense_reference() {
    for (scoring, norm, bias) in [
        (sobre_model::ScoringFunc::Softmax, false, false),
        (sobre_model::ScoringFunc::Softmax, true, false),
        (sobre_model::ScoringFunc::Sigmoid, true, true),
    ] {
        let mut cfg = test_config();
        cfg.scoring_func = scoring;
        cfg.norm_topk_prob = norm;
        cfg.aux_loss_free_bias = bias;
        cfg.routed_scaling_factor = if bias { 2.5 } else { 1.0 };
        let mut m = model(&cfg, 3);
        if bias {
            // A non-zero bias so the choice differs from plain top-k.
            m.update_expert_bias(&[vec![9, 0, 3, 3, 1, 2], vec![0, 0, 0, 9, 9, 0]], 0.05);
        }
        let b = Batch::left_padded(
            &[
                ids(13, 5, cfg.vocab_size),
                ids(8, 6, cfg.vocab_size),
                ids(2, 7, cfg.vocab_size),
            ],
            0,
        );
        let fast = m.forward(
            &b,
            None,
            ForwardOptions {
                aux_loss: true,
                ..Default::default()
            },
        );
        let slow = m.forward(
            &b,
            None,
            ForwardOptions {
                moe: MoeImpl::DenseReference,
                aux_loss: true,
                ..Default::default()
            },
        );
        let d = max_diff(&values(fast.logits), &values(slow.logits));
        assert!(
            d < 1e-5,
            "{scoring:?} norm={norm}: dispatch vs reference {d:e}"
        );
        assert_eq!(fast.router.expert_counts, slow.router.expert_counts);
        // Every real token counts k times in each sparse layer: (13 + 8 + 2) · 3.
        for layer in &fast.router.expert_counts {
            assert_eq!(layer.iter().sum::<u32>(), 23 * 3);
        }
        let (a, b) = (
            fast.router.aux_loss.unwrap().into_scalar::<f32>(),
            slow.router.aux_loss.unwrap().into_scalar::<f32>(),
        );
        assert!((a - b).abs() < 1e-6 && a > 0.0, "aux loss {a} vs {b}");
    }
}

#[test]
fn batched_unequal_lengths_equal_each_sequence_alone() {
    let cfg = test_config();
    let m = model(&cfg, 4);
    let v = cfg.vocab_size;
    let seqs = vec![ids(7, 8, v), ids(3, 9, v), ids(5, 10, v)];
    for left in [true, false] {
        let b = if left {
            Batch::left_padded(&seqs, 0)
        } else {
            Batch::right_padded(&seqs, 0)
        };
        let out = values(m.forward(&b, None, ForwardOptions::default()).logits);
        // Masked scores are -inf; a left-padding query has no key, and must still give a finite
        // row (its own column stays open), or NaN would reach real rows through V.
        assert!(
            out.iter().all(|x| x.is_finite()),
            "left={left}: non-finite logits"
        );
        for (r, s) in seqs.iter().enumerate() {
            let alone = values(
                m.forward(
                    &Batch::left_padded(std::slice::from_ref(s), 0),
                    None,
                    ForwardOptions::default(),
                )
                .logits,
            );
            let offset = if left { 7 - s.len() } else { 0 };
            let got = &out[(r * 7 + offset) * v..(r * 7 + offset + s.len()) * v];
            let d = max_diff(got, &alone);
            assert!(d < 1e-5, "left={left} row {r}: batched vs alone {d:e}");
        }
    }
}

#[test]
fn save_then_load_gives_identical_logits() {
    let mut cfg = test_config();
    cfg.aux_loss_free_bias = true;
    let mut m = model(&cfg, 5);
    m.update_expert_bias(&[vec![1, 2, 3, 4, 5, 6], vec![6, 5, 4, 3, 2, 1]], 0.01);
    let b = Batch::left_padded(&[ids(6, 11, cfg.vocab_size)], 0);
    let before = values(m.forward(&b, None, ForwardOptions::default()).logits);
    let dir = tempfile::tempdir().unwrap();
    for (name, shard) in [("single", None), ("sharded", Some(20_000))] {
        let path = dir.path().join(name);
        save_model(&m, &path, shard).unwrap();
        assert_eq!(
            path.join("model.safetensors.index.json").exists(),
            shard.is_some()
        );
        let loaded = load_model(&path, &default_device()).unwrap();
        assert_eq!(loaded.config, {
            let mut c = cfg.clone();
            c.unknown_keys.clear();
            c
        });
        let after = values(loaded.forward(&b, None, ForwardOptions::default()).logits);
        assert_eq!(before, after, "{name}: logits changed across save/load");
    }
    // Saving over an existing directory replaces it whole.
    save_model(&m, &dir.path().join("single"), None).unwrap();
    assert!(
        !dir.path()
            .join("single")
            .join("model.safetensors.index.json")
            .exists()
    );
}

#[test]
fn init_is_deterministic_and_scaled() {
    let cfg = ModelConfig::preset("tiny").unwrap();
    let a = values(model(&cfg, 7).embed_tokens.val());
    let b = values(model(&cfg, 7).embed_tokens.val());
    let c = values(model(&cfg, 8).embed_tokens.val());
    assert_eq!(a, b);
    assert_ne!(a, c);
    let n = a.len() as f32;
    let mean = a.iter().sum::<f32>() / n;
    let std = (a.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / n).sqrt();
    // 2048 draws of N(0, 0.02): the sample std is within 5% of 0.02 with overwhelming odds.
    assert!((std - 0.02).abs() < 0.001, "std {std}");
    assert!(mean.abs() < 0.002, "mean {mean}");
    // Residual projections are scaled by 1/sqrt(2·layers) = 1/2 for the 2-layer preset.
    let m = model(&cfg, 7);
    let o = values(m.layers[0].self_attn.o_proj.weight.val());
    let so = (o.iter().map(|x| x * x).sum::<f32>() / o.len() as f32).sqrt();
    assert!((so - 0.01).abs() < 0.0015, "o_proj std {so}");
}

/// Central finite differences against autodiff, for entries of several kinds of parameter.
#[test]
fn gradients_match_finite_differences() {
    let mut cfg = test_config();
    cfg.initializer_range = 0.2;
    let device = default_device();
    let m = init_model(&cfg, 9, &device.clone().autodiff());
    let b = Batch::left_padded(&[ids(6, 12, cfg.vocab_size), ids(4, 13, cfg.vocab_size)], 0);
    let v = cfg.vocab_size;
    let n = 2 * 6 * v;
    let r: Vec<f32> = (0..n)
        .map(|i| ((i * 37 % 101) as f32 / 101.0) - 0.5)
        .collect();
    let loss_of = |m: &MoeModel| {
        let out = m.forward(
            &b,
            None,
            ForwardOptions {
                aux_loss: true,
                ..Default::default()
            },
        );
        let w = Tensor::<3>::from_data(TensorData::new(r.clone(), [2, 6, v]), &out.logits.device());
        (out.logits * w).sum() + out.router.aux_loss.unwrap() * 0.5
    };
    let grads = loss_of(&m).backward();

    // (name, getter, setter) over a flat view of each parameter.
    type Get = fn(&MoeModel) -> Param<Tensor<2>>;
    type Set = fn(&mut MoeModel, Param<Tensor<2>>);
    let cases: Vec<(&str, Get, Set)> = vec![
        (
            "embed_tokens",
            |m| m.embed_tokens.clone(),
            |m, p| m.embed_tokens = p,
        ),
        (
            "layers.0.q_proj",
            |m| m.layers[0].self_attn.q_proj.weight.clone(),
            |m, p| m.layers[0].self_attn.q_proj.weight = p,
        ),
        (
            "layers.2.router",
            |m| match &m.layers[2].mlp {
                Ffn::Sparse(s) => s.router.clone(),
                _ => unreachable!(),
            },
            |m, p| {
                if let Ffn::Sparse(s) = &mut m.layers[2].mlp {
                    s.router = p
                }
            },
        ),
        (
            "lm_head",
            |m| m.lm_head.clone().unwrap(),
            |m, p| m.lm_head = Some(p),
        ),
    ];
    let base = m.valid();
    for (name, get, set) in cases {
        let param = get(&m);
        let g = values(param.val().grad(&grads).expect("gradient exists"));
        let w0 = values(get(&base).val());
        let dims = get(&base).val().dims();
        for &idx in &[0usize, w0.len() / 3, w0.len() / 2 + 1, w0.len() - 1] {
            let eval = |delta: f32| {
                let mut w = w0.clone();
                w[idx] += delta;
                let mut mm = base.clone();
                set(
                    &mut mm,
                    Param::from_tensor(Tensor::from_data(TensorData::new(w, dims), &device)),
                );
                loss_of(&mm).into_scalar::<f32>() as f64
            };
            // Top-k routing is piecewise: a step that flips an expert choice shows up as one-sided
            // differences that disagree. Shrink the step until both sides agree, then compare.
            // `noise` bounds the f32 round-off of the loss (~768 summed terms) divided by h.
            let at0 = eval(0.0);
            let (fd, noise) = [1e-2f32, 3e-3, 1e-3]
                .iter()
                .find_map(|&h| {
                    let noise = 16.0 * f32::EPSILON as f64 * at0.abs().max(1.0) / h as f64;
                    let (fwd, bwd) = ((eval(h) - at0) / h as f64, (at0 - eval(-h)) / h as f64);
                    let smooth = (fwd - bwd).abs() <= 0.05 * fwd.abs().max(bwd.abs()) + 2.0 * noise;
                    smooth.then_some((((fwd + bwd) / 2.0) as f32, noise as f32))
                })
                .unwrap_or_else(|| panic!("{name}[{idx}]: no step size gives a smooth difference"));
            let tol = 2e-2 * g[idx].abs() + noise;
            assert!(
                (fd - g[idx]).abs() <= tol,
                "{name}[{idx}]: autodiff {} vs finite difference {fd}",
                g[idx]
            );
        }
    }
}

#[test]
fn expert_gradients_agree_between_dispatch_and_reference() {
    let cfg = test_config();
    let device = default_device().autodiff();
    let m = init_model(&cfg, 10, &device);
    let b = Batch::left_padded(&[ids(9, 14, cfg.vocab_size)], 0);
    let grad_of = |moe: MoeImpl| {
        let out = m.forward(
            &b,
            None,
            ForwardOptions {
                moe,
                ..Default::default()
            },
        );
        let grads = out.logits.square().sum().backward();
        let Ffn::Sparse(s) = &m.layers[0].mlp else {
            unreachable!()
        };
        (
            values(s.experts_gate_up.val().grad(&grads).unwrap()),
            values(s.router.val().grad(&grads).unwrap()),
        )
    };
    let (a_gu, a_r) = grad_of(MoeImpl::Dispatch);
    let (b_gu, b_r) = grad_of(MoeImpl::DenseReference);
    let scale = a_gu.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    assert!(scale > 0.0);
    assert!(
        max_diff(&a_gu, &b_gu) < 1e-4 * scale.max(1.0),
        "expert grads differ"
    );
    assert!(
        max_diff(&a_r, &b_r) < 1e-4 * a_r.iter().fold(1.0f32, |m, x| m.max(x.abs())),
        "router grads differ"
    );
}

#[test]
fn fused_kernels_agree_with_the_reference_on_the_whole_model() {
    // Left padding (queries without keys), a dense layer, a gated shared expert, q/k norms.
    let cfg = test_config();
    let device = default_device().autodiff();
    let m = init_model(&cfg, 12, &device);
    let v = cfg.vocab_size;
    let b = Batch::left_padded(&[ids(9, 15, v), ids(5, 16, v), ids(7, 17, v)], 0);
    let run = |kernels: Kernels| {
        let out = m.forward(
            &b,
            None,
            ForwardOptions {
                kernels,
                aux_loss: true,
                ..Default::default()
            },
        );
        let logits = values(out.logits.clone());
        let loss = out.logits.square().mean() + out.router.aux_loss.unwrap();
        let grads = loss.backward();
        let Ffn::Sparse(s) = &m.layers[0].mlp else {
            unreachable!()
        };
        let attn = &m.layers[2].self_attn;
        let shared = s.shared_expert.as_ref().unwrap();
        let need = "a gradient for every parameter";
        let grads = vec![
            values(m.embed_tokens.val().grad(&grads).expect(need)),
            values(
                m.layers[0]
                    .input_layernorm
                    .weight
                    .val()
                    .grad(&grads)
                    .expect(need),
            ),
            values(
                attn.q_norm
                    .as_ref()
                    .unwrap()
                    .weight
                    .val()
                    .grad(&grads)
                    .expect(need),
            ),
            values(attn.q_proj.weight.val().grad(&grads).expect(need)),
            values(s.router.val().grad(&grads).expect(need)),
            values(s.experts_gate_up.val().grad(&grads).expect(need)),
            values(s.experts_down.val().grad(&grads).expect(need)),
            values(shared.gate_up.val().grad(&grads).expect(need)),
            values(m.norm.weight.val().grad(&grads).expect(need)),
        ];
        (logits, grads)
    };
    let (fused_logits, fused_grads) = run(Kernels::Fused);
    let (ref_logits, ref_grads) = run(Kernels::Reference);
    let scale = |v: &[f32]| v.iter().fold(f32::MIN_POSITIVE, |m, x| m.max(x.abs()));
    assert!(fused_logits.iter().all(|x| x.is_finite()));
    assert!(max_diff(&fused_logits, &ref_logits) <= 1e-5 * scale(&ref_logits));
    for (i, (a, r)) in fused_grads.iter().zip(&ref_grads).enumerate() {
        assert!(scale(r) > 1e-12, "parameter {i} got no gradient");
        let d = max_diff(a, r) / scale(r);
        assert!(d <= 1e-4, "gradient {i} differs by {d:e} of its scale");
    }
}

/// `token_scores` (final norm, then the LM head and log-softmax in chunks of rows) against the
/// reference's whole logits and `token_logprobs`: log-probabilities, entropies and the
/// gradients of the head (untied, and tied to the embedding), the final norm and a layer, for
/// chunks that do and do not divide the 21 positions, tempered, with Granite's
/// `logits_scaling`.
#[test]
fn chunked_token_scores_agree_with_the_whole_logits() {
    for tied in [false, true] {
        let mut cfg = test_config();
        cfg.tie_word_embeddings = tied;
        cfg.logits_scaling = 1.7;
        let device = default_device().autodiff();
        let m = init_model(&cfg, 13, &device);
        let v = cfg.vocab_size;
        let b = Batch::right_padded(&[ids(9, 18, v), ids(5, 19, v), ids(7, 20, v)], 0);
        let positions: Vec<usize> = (0..21).map(|i| (i * 5) % (3 * 9)).collect();
        let targets: Vec<usize> = (0..21).map(|i| (i * 11 + 2) % v).collect();
        let run = |kernels: Kernels, chunk: usize| {
            let opts = ForwardOptions {
                kernels,
                logits_chunk_rows: chunk,
                ..Default::default()
            };
            let (h, _) = m.hidden_at(&b, &positions, opts);
            let (lp, ent) = m.token_scores(h, &targets, 0.7, true, opts);
            let weights: Vec<f32> = (0..21).map(|i| (i as f32 * 0.37).sin()).collect();
            let w = Tensor::<1>::from_data(TensorData::new(weights, [21]), &device);
            let grads = (lp.clone() * w).sum().backward();
            let need = "a gradient";
            let head = match &m.lm_head {
                Some(h) => values(h.val().grad(&grads).expect(need)),
                None => values(m.embed_tokens.val().grad(&grads).expect(need)),
            };
            let g = vec![
                head,
                values(m.norm.weight.val().grad(&grads).expect(need)),
                values(
                    m.layers[2]
                        .self_attn
                        .q_proj
                        .weight
                        .val()
                        .grad(&grads)
                        .expect(need),
                ),
            ];
            (values(lp), ent, g)
        };
        let (ref_lp, ref_ent, ref_g) = run(Kernels::Reference, 0);
        let scale = |v: &[f32]| v.iter().fold(f32::MIN_POSITIVE, |m, x| m.max(x.abs()));
        for chunk in [1, 4, 7, 21, 0] {
            let (lp, ent, g) = run(Kernels::Fused, chunk);
            let d = max_diff(&lp, &ref_lp) / scale(&ref_lp);
            assert!(
                d <= 1e-5,
                "log-probs differ by {d:e} (tied {tied}, chunk {chunk})"
            );
            let d = max_diff(&ent, &ref_ent) / scale(&ref_ent);
            assert!(
                d <= 1e-5,
                "entropies differ by {d:e} (tied {tied}, chunk {chunk})"
            );
            for (i, (a, r)) in g.iter().zip(&ref_g).enumerate() {
                assert!(scale(r) > 1e-12, "parameter {i} got no gradient");
                let d = max_diff(a, r) / scale(r);
                assert!(
                    d <= 1e-5,
                    "gradient {i} differs by {d:e} (tied {tied}, chunk {chunk})"
                );
            }
        }
    }
}

/// Every parameter's gradient of `loss(model)`, by module path (those without one left out).
fn all_grads(m: &MoeModel, grads: &burn::tensor::Gradients) -> Vec<(String, Vec<f32>)> {
    struct Collect<'a>(&'a burn::tensor::Gradients, Vec<(String, Vec<f32>)>, usize);
    impl burn::module::ModuleVisitor for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
            self.2 += 1;
            if let Some(g) = p.val().grad(self.0) {
                self.1.push((format!("param {}", self.2), values(g)));
            }
        }
    }
    let mut c = Collect(grads, vec![], 0);
    burn::module::Module::visit(m, &mut c);
    c.1
}

/// Activation recomputation (`ForwardOptions::recompute_layers`, gradient checkpointing) gives
/// the same logits, the same balance loss and the same gradient for every parameter as the
/// stored-activation backward: a MoE with a dense layer, a gated shared expert and q/k norms,
/// left padding, the router's balance loss in the loss; and a LoRA model whose base (the
/// embeddings included) is frozen, where only the adapters get gradients.
#[test]
fn recomputed_layers_give_the_same_gradients() {
    let cfg = test_config();
    let device = default_device().autodiff();
    let base = init_model(&cfg, 14, &device);
    let lora_cfg = sobre_model::LoraConfig {
        r: 2,
        alpha: 4.0,
        dropout: 0.0,
        target_modules: vec!["q_proj".into(), "down_proj".into()],
        use_rslora: false,
        init: sobre_model::LoraInit::Random,
    };
    let adapted = sobre_model::lora::add_adapters(base.clone(), &lora_cfg, 3).unwrap();
    let v = cfg.vocab_size;
    let b = Batch::left_padded(&[ids(9, 21, v), ids(5, 22, v), ids(7, 23, v)], 0);
    for (name, m) in [("full", &base), ("lora", &adapted)] {
        let run = |recompute_layers: bool| {
            let out = m.forward(
                &b,
                None,
                ForwardOptions {
                    aux_loss: true,
                    recompute_layers,
                    ..Default::default()
                },
            );
            let aux = out.router.aux_loss.unwrap();
            let loss = (out.logits.clone() * out.logits.clone().sin()).mean() + aux.clone() * 0.5;
            let grads = loss.backward();
            (values(out.logits), values(aux), all_grads(m, &grads))
        };
        let (logits, aux, grads) = run(false);
        let (logits_r, aux_r, grads_r) = run(true);
        let scale = |v: &[f32]| v.iter().fold(f32::MIN_POSITIVE, |m, x| m.max(x.abs()));
        assert!(
            max_diff(&logits, &logits_r) <= 1e-6 * scale(&logits),
            "{name}: logits"
        );
        assert!(
            max_diff(&aux, &aux_r) <= 1e-6 * scale(&aux),
            "{name}: balance loss"
        );
        let paths = |g: &[(String, Vec<f32>)]| g.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>();
        assert_eq!(
            paths(&grads),
            paths(&grads_r),
            "{name}: the same parameters get gradients"
        );
        if name == "lora" {
            // Only the adapters (2 matrices × 2 targets × 3 layers, down_proj on the dense layer only
            // and every expert's down_proj untargeted here) are trained.
            assert!(grads.len() < 20, "{name}: {} gradients", grads.len());
        }
        for ((p, a), (_, r)) in grads.iter().zip(&grads_r) {
            assert!(scale(a) > 1e-12, "{name} {p}: no gradient");
            let d = max_diff(a, r) / scale(a);
            assert!(
                d <= 1e-5,
                "{name} {p}: recomputed gradient differs by {d:e}"
            );
        }
    }
}

// ---- bad inputs ----

fn saved_fixture() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    save_model(&model(&test_config(), 11), &dir.path().join("m"), None).unwrap();
    dir
}

fn err_text(r: Result<MoeModel, ModelError>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn truncated_safetensors_is_a_clear_error() {
    let dir = saved_fixture();
    let f = dir.path().join("m/model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let msg = err_text(load_model(&dir.path().join("m"), &default_device()));
    assert!(
        msg.contains("model.safetensors") && msg.contains("truncated or corrupt"),
        "{msg}"
    );
}

#[test]
fn wrong_dtype_is_a_clear_error() {
    let dir = saved_fixture();
    let f = dir.path().join("m/model.safetensors");
    let data: Vec<u8> = (0..8 * 4u64).flat_map(|x| x.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![8, 4], &data).unwrap();
    safetensors::serialize_to_file(vec![("model.norm.weight".to_string(), view)], None, &f)
        .unwrap();
    let msg = err_text(load_model(&dir.path().join("m"), &default_device()));
    assert!(
        msg.contains("model.norm.weight")
            && msg.contains("I64")
            && msg.contains("expected F32, BF16 or F16"),
        "{msg}"
    );
}

#[test]
fn missing_unexpected_and_misshapen_tensors_are_listed_together() {
    let m = model(&test_config(), 12);
    let mut tensors = sobre_model::io::hf_tensors(&m);
    tensors.retain(|(n, _, _)| n != "model.norm.weight" && n != "model.layers.0.mlp.gate.weight");
    tensors.push(("model.extra.weight".into(), vec![2], vec![0.0, 1.0]));
    for t in tensors.iter_mut().filter(|t| t.0 == "lm_head.weight") {
        t.1 = vec![t.1[1], t.1[0]];
    }
    let dir = tempfile::tempdir().unwrap();
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, v)| {
            (
                n.clone(),
                s.clone(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views: Vec<_> = bytes
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors")).unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        m.config.to_json().to_string(),
    )
    .unwrap();
    let msg = err_text(load_model(dir.path(), &default_device()));
    for needle in [
        "missing tensor `model.norm.weight` (expected shape [32])",
        "missing tensor `model.layers.0.mlp.gate.weight` (expected shape [6, 32])",
        "unexpected tensor `model.extra.weight`",
        "tensor `lm_head.weight` has shape [32, 64], expected [64, 32]",
    ] {
        assert!(msg.contains(needle), "missing `{needle}` in:\n{msg}");
    }
}

#[test]
fn bf16_and_f16_weights_read_as_f32() {
    let m = model(&test_config(), 13);
    let tensors = sobre_model::io::hf_tensors(&m);
    let dir = tempfile::tempdir().unwrap();
    // Store every tensor in bf16 except one in f16; the loaded model must hold the rounded values.
    let bytes: Vec<(String, Vec<usize>, safetensors::Dtype, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, v)| {
            if n == "model.norm.weight" {
                (
                    n.clone(),
                    s.clone(),
                    safetensors::Dtype::F16,
                    v.iter()
                        .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                        .collect(),
                )
            } else {
                (
                    n.clone(),
                    s.clone(),
                    safetensors::Dtype::BF16,
                    v.iter()
                        .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                        .collect(),
                )
            }
        })
        .collect();
    let views: Vec<_> = bytes
        .iter()
        .map(|(n, s, d, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors")).unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        m.config.to_json().to_string(),
    )
    .unwrap();
    let loaded = load_model(dir.path(), &default_device()).unwrap();
    let want: Vec<f32> = values(m.embed_tokens.val())
        .iter()
        .map(|x| half::bf16::from_f32(*x).to_f32())
        .collect();
    assert_eq!(values(loaded.embed_tokens.val()), want);
    let want: Vec<f32> = values(m.norm.weight.val())
        .iter()
        .map(|x| half::f16::from_f32(*x).to_f32())
        .collect();
    assert_eq!(values(loaded.norm.weight.val()), want);
}

#[test]
fn bad_configs_name_the_key_and_value() {
    let base = model(&test_config(), 14).config.to_json();
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        (
            "rope_scaling",
            serde_json::json!({"rope_type": "dynamic", "factor": 4.0}),
            "unsupported `rope_scaling.rope_type` \"dynamic\"",
        ),
        (
            "use_sliding_window",
            serde_json::json!(true),
            "unsupported `use_sliding_window` = true",
        ),
        (
            "hidden_act",
            serde_json::json!("gelu"),
            "unsupported `hidden_act` \"gelu\"",
        ),
        (
            "model_type",
            serde_json::json!("gpt2"),
            "unsupported `model_type` \"gpt2\"",
        ),
        (
            "num_key_value_heads",
            serde_json::json!(3),
            "must be a multiple of `num_key_value_heads` (3)",
        ),
        (
            "hidden_size",
            serde_json::json!("big"),
            "`hidden_size` must be a non-negative integer, found \"big\"",
        ),
        (
            "scoring_func",
            serde_json::json!("relu"),
            "unsupported `scoring_func` \"relu\"",
        ),
        (
            "num_experts_per_tok",
            serde_json::json!(9),
            "`num_experts_per_tok` must be in 1..=6",
        ),
    ];
    for (key, value, want) in cases {
        let mut cfg = base.clone();
        cfg[key] = value;
        let err = ModelConfig::from_json_str(&cfg.to_string(), "x/config.json")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("x/config.json: ") && err.contains(want),
            "{key}: {err}"
        );
    }
    let mut cfg = base.clone();
    cfg.as_object_mut().unwrap().remove("vocab_size");
    let err = ModelConfig::from_json_str(&cfg.to_string(), "c.json")
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing required key `vocab_size`"), "{err}");
    let err = ModelConfig::from_json_str("{\"model_type\": ", "c.json")
        .unwrap_err()
        .to_string();
    assert!(err.contains("c.json: not valid JSON"), "{err}");
    // Unknown keys are kept for the caller to warn about, not silently dropped.
    let mut cfg = base.clone();
    cfg["fancy_new_option"] = serde_json::json!(1);
    assert_eq!(
        ModelConfig::from_json_str(&cfg.to_string(), "c")
            .unwrap()
            .unknown_keys,
        vec!["fancy_new_option"]
    );
}

#[test]
fn config_round_trips_through_json() {
    let mut cfg = test_config();
    cfg.scoring_func = sobre_model::ScoringFunc::Sigmoid;
    cfg.aux_loss_free_bias = true;
    cfg.routed_scaling_factor = 2.0;
    cfg.eos_token_id = vec![3, 4];
    cfg.pad_token_id = Some(0);
    let back = ModelConfig::from_json_str(&cfg.to_json().to_string(), "c").unwrap();
    assert_eq!(back, cfg);
    for name in ["tiny", "small", "w1"] {
        let p = ModelConfig::preset(name).unwrap();
        assert_eq!(
            ModelConfig::from_json_str(&p.to_json().to_string(), "c").unwrap(),
            p
        );
    }
    let w1 = ModelConfig::preset("w1").unwrap();
    assert_eq!(
        (
            w1.vocab_size,
            w1.hidden_size,
            w1.num_hidden_layers,
            w1.num_attention_heads
        ),
        (512, 256, 4, 4)
    );
    assert_eq!(
        (
            w1.num_key_value_heads,
            w1.head_dim,
            w1.num_experts,
            w1.num_experts_per_tok
        ),
        (2, 64, 8, 2)
    );
    assert_eq!(
        (
            w1.moe_intermediate_size,
            w1.intermediate_size,
            w1.tie_word_embeddings
        ),
        (128, 512, false)
    );
    assert!((0..4).all(|i| w1.is_sparse_layer(i)));
}

#[test]
fn parameter_counts_match_the_tensors() {
    for name in ["tiny", "small", "w1"] {
        let cfg = ModelConfig::preset(name).unwrap();
        let m = model(&cfg, 0);
        let actual: usize = sobre_model::io::hf_tensors(&m)
            .iter()
            .map(|(_, _, v)| v.len())
            .sum();
        assert_eq!(cfg.count_parameters().0, actual, "{name}");
    }
    // w1 by hand: attention 4·(256·256 + 2·256·128 + 256·256) + qk norms 4·128 + layer norms
    // 4·512 + routers 4·8·256 + experts 4·8·3·256·128 + embed 512·256 + head 256·512 + norm 256.
    let w1 = ModelConfig::preset("w1").unwrap();
    let attn = 4 * (256 * 256 + 2 * 256 * 128 + 256 * 256) + 4 * 128;
    let want = attn + 4 * 512 + 4 * 8 * 256 + 4 * 8 * 3 * 256 * 128 + 2 * 512 * 256 + 256;
    assert_eq!(w1.count_parameters().0, want);
    let active = attn + 4 * 512 + 4 * 8 * 256 + 4 * 2 * 3 * 256 * 128 + 2 * 512 * 256 + 256;
    assert_eq!(w1.count_parameters().1, active);
}
