//! Whole-pipeline tests on the tiny preset: exact resume, and every loss variant runs.

mod common;

use std::path::Path;

use sobre_train::Config;
use sobre_train::pipeline::{Pipeline, RunOptions};

use common::smoke;

fn run(
    dir: &Path,
    sets: &[&str],
    resume: bool,
    stop_after: Option<usize>,
) -> sobre_train::pipeline::Summary {
    common::run(
        &smoke(),
        "configs/smoke.toml",
        sets,
        dir,
        resume,
        stop_after,
    )
}

fn weights(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("model.safetensors")).unwrap()
}

#[test]
fn six_straight_steps_equal_three_plus_resume_plus_three() {
    // Cosine schedule, KL, two mini-batches and μ = 2 so every piece of state matters.
    let sets = [
        "run.steps=6",
        "run.save_every=3",
        "grpo.mini_batch_size=8",
        "grpo.num_iterations=2",
        "model.aux_loss_free_bias=true",
    ];
    let a = tempfile::tempdir().unwrap();
    let straight = run(a.path(), &sets, false, None);
    assert_eq!(straight.grpo_steps, 6);
    let b = tempfile::tempdir().unwrap();
    let first = run(b.path(), &sets, false, Some(3));
    assert!(first.interrupted);
    assert_eq!(first.grpo_steps, 3);
    let second = run(b.path(), &sets, true, None);
    assert_eq!(second.grpo_steps, 6);
    let wa = weights(&a.path().join("checkpoints/step-000006"));
    let wb = weights(&b.path().join("checkpoints/step-000006"));
    assert!(wa == wb, "weights differ after resume");
    let oa = std::fs::read(
        a.path()
            .join("checkpoints/step-000006/optimizer.safetensors"),
    )
    .unwrap();
    let ob = std::fs::read(
        b.path()
            .join("checkpoints/step-000006/optimizer.safetensors"),
    )
    .unwrap();
    assert!(oa == ob, "optimizer state differs after resume");
    // Training moved the weights away from the SFT checkpoint.
    assert!(weights(&a.path().join("checkpoints/sft")) != wa);
    // The metrics of the resumed run hold each step once.
    let lines = std::fs::read_to_string(b.path().join("metrics.jsonl")).unwrap();
    let grpo: Vec<u64> = lines
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["stage"] == "grpo")
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(grpo, vec![1, 2, 3, 4, 5, 6]);
    // The resumed run's cost covers both parts: the same work as the straight run.
    let (ca, cb) = (&straight.cost, &second.cost);
    assert_eq!(
        (ca.tokens_generated, ca.tokens_trained),
        (cb.tokens_generated, cb.tokens_trained)
    );
    assert!((ca.flops_estimate - cb.flops_estimate).abs() <= 1e-9 * ca.flops_estimate);
    assert!(cb.wall_seconds >= first.cost.wall_seconds && cb.cpu_seconds > first.cost.cpu_seconds);
    for c in [ca, cb] {
        assert!(c.tokens_generated > 0 && c.tokens_trained > c.tokens_generated);
        assert!((c.energy_wh_estimate - c.cpu_seconds * 10.0 / 3600.0).abs() < 1e-9);
    }
    // Tokens generated = Σ over GRPO steps of tokens_per_second × time_step (the same count).
    let from_metrics: f64 = std::fs::read_to_string(a.path().join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["stage"] == "grpo")
        .map(|v| v["tokens_per_second"].as_f64().unwrap() * v["time_step"].as_f64().unwrap())
        .sum();
    assert!(
        (from_metrics - ca.tokens_generated as f64).abs() < 1e-6 * from_metrics,
        "{from_metrics} vs {}",
        ca.tokens_generated
    );
    // keep_last = 2
    assert!(
        !b.path().join("checkpoints/step-000003").exists()
            || !b.path().join("checkpoints/step-000000").exists()
    );
}

#[test]
fn every_loss_and_option_runs_finite() {
    for sets in [
        &["grpo.loss=\"bnpo\"", "grpo.scale_rewards=\"batch\""][..],
        &[
            "grpo.loss=\"dr_grpo\"",
            "grpo.scale_rewards=\"none\"",
            "grpo.kl_estimator=\"k1\"",
        ],
        &[
            "grpo.loss=\"dapo\"",
            "grpo.mini_batch_size=4",
            "grpo.mask_truncated_completions=true",
            "grpo.kl_estimator=\"k2\"",
        ],
        &[
            "grpo.loss=\"gspo\"",
            "grpo.epsilon=3e-4",
            "grpo.epsilon_high=4e-4",
            "grpo.beta=0",
        ],
        &[
            "grpo.filter_zero_std_groups=true",
            "grpo.max_resample_rounds=1",
            "eval.eval_every=2",
            "eval.n=4",
        ],
    ] {
        let d = tempfile::tempdir().unwrap();
        let mut all = vec!["run.steps=2", "sft.steps=1"];
        all.extend_from_slice(sets);
        let s = run(d.path(), &all, false, None);
        assert_eq!(s.grpo_steps, 2, "{sets:?}");
        let m = s.last_metrics.unwrap();
        assert!(
            m["grad_norm"].is_number() || m["num_groups"] == 0,
            "{sets:?}: {m}"
        );
    }
}

/// A non-finite loss in any data-parallel shard skips the whole update: weights and optimizer
/// state stay as they were. A finite one updates.
#[test]
fn non_finite_loss_skips_the_update() {
    use sobre_train::optim::{AdamW, AdamWConfig, apply_gradients, sharded_gradients};
    let device = sobre_model::default_device().autodiff();
    let cfg = sobre_model::ModelConfig::preset("tiny").unwrap();
    let model = sobre_model::init_model(&cfg, 1, &device);
    let before = sobre_model::io::hf_tensors(&model);
    let mut opt = AdamW::new(AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    });
    // Shard 1 of 2 is NaN.
    let (loss, grads, _) = sharded_gradients(
        &model,
        2,
        false,
        |m, i| ((m.embed_tokens.val().sum(), i), None),
        |(sum, i), _| (Some(if i == 1 { sum * f64::NAN } else { sum }), ()),
    );
    assert!(loss.is_nan() && grads.is_none());
    let (model, out) = apply_gradients(model, grads, &mut opt, 1e-3, 1.0);
    assert!(out.skipped);
    assert_eq!(opt.step, 0);
    assert_eq!(sobre_model::io::hf_tensors(&model), before);
    // A finite loss does update (and only the parameters it reaches).
    let (_, grads, _) = sharded_gradients(
        &model,
        2,
        true,
        |m, _| (m.embed_tokens.val().sum(), None),
        |sum, _| (Some(sum), ()),
    );
    let (model, out) = apply_gradients(model, grads, &mut opt, 1e-3, 1.0);
    assert!(!out.skipped && out.grad_norm > 0.0);
    assert_ne!(sobre_model::io::hf_tensors(&model), before);
}

#[test]
fn interrupted_sft_and_partial_checkpoints_resume_cleanly() {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    let sets: Vec<String> = ["run.steps=2", "run.save_every=0"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let a = tempfile::tempdir().unwrap();
    run(a.path(), &["run.steps=2", "run.save_every=0"], false, None);

    // Stopped before the first SFT step: an `sft-000000` checkpoint, then a resume.
    let b = tempfile::tempdir().unwrap();
    let (cfg, src) = Config::parse(&smoke(), "smoke", &sets).unwrap();
    let stop = Arc::new(AtomicBool::new(true));
    let opts = RunOptions {
        resume: false,
        out_dir: Some(b.path().to_path_buf()),
        stop: Some(stop),
        quiet: true,
        stop_after: None,
    };
    let s = Pipeline::new(cfg, src, opts).unwrap().run().unwrap();
    assert!(s.interrupted && s.sft_steps == 0);
    assert!(
        b.path()
            .join("checkpoints/sft-000000/trainer_state.json")
            .exists()
    );
    // What a process killed mid-write leaves: a partial directory and one without its state file.
    std::fs::create_dir_all(b.path().join("checkpoints/.step-000009.partial-1")).unwrap();
    std::fs::create_dir_all(b.path().join("checkpoints/step-000008")).unwrap();
    std::fs::write(
        b.path().join("checkpoints/step-000008/model.safetensors"),
        b"garbage",
    )
    .unwrap();
    let s = run(b.path(), &["run.steps=2", "run.save_every=0"], true, None);
    assert_eq!((s.sft_steps, s.grpo_steps), (2, 2));
    assert!(!b.path().join("checkpoints/.step-000009.partial-1").exists());
    assert!(
        !b.path().join("checkpoints/sft-000000").exists(),
        "mid-SFT checkpoints are pruned at the end of SFT"
    );
    assert!(
        weights(&a.path().join("checkpoints/step-000002"))
            == weights(&b.path().join("checkpoints/step-000002"))
    );
}

/// `[data] sft_size`: demonstrations and GRPO prompts are disjoint draws of the train split, and
/// the prompts carry no solution.
#[test]
fn sft_size_draws_demonstrations_apart_from_solution_free_prompts() {
    let sets = vec!["data.sft_size=30".to_string()];
    let (cfg, _) = Config::parse(&smoke(), "configs/smoke.toml", &sets).unwrap();
    let data = sobre_train::data::load_data(&cfg).unwrap();
    assert_eq!((data.demos.len(), data.train.len()), (30, 200));
    assert!(data.demos.iter().all(|s| s.completion.is_some()));
    assert!(data.train.iter().all(|s| s.completion.is_none()));
    let key = |s: &sobre_data::Sample| {
        let mut nums: Vec<i64> = s.fields["nums"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        nums.sort_unstable();
        (nums, s.fields["target"].as_i64().unwrap())
    };
    let demo_keys: std::collections::BTreeSet<_> = data.demos.iter().map(key).collect();
    assert_eq!(demo_keys.len(), 30);
    assert!(data.train.iter().all(|s| !demo_keys.contains(&key(s))));
    // Without sft_size, SFT trains on the prompts' own solutions (200 of them).
    let (cfg, _) = Config::parse(&smoke(), "configs/smoke.toml", &[]).unwrap();
    let data = sobre_train::data::load_data(&cfg).unwrap();
    assert_eq!((data.demos.len(), data.train.len()), (200, 200));

    for (set, key) in [
        ("data.sft_size=0", "data.sft_size"),
        ("eval.compare.sft=\"x\"", "eval.compare.sft"),
        ("eval.samples_per_problem=0", "eval.samples_per_problem"),
    ] {
        let err = Config::parse(&smoke(), "configs/smoke.toml", &[set.to_string()]).unwrap_err();
        assert_eq!(err.key.as_deref(), Some(key), "{set}: {err}");
    }
}

/// `[eval] at_end`: the SFT checkpoint, the final checkpoint and the baselines on the same
/// problems. A baseline that is the same model as `final` scores exactly what `final` scores
/// (same problems, same per-sample seeds); a missing one is a row with a note.
#[test]
fn at_end_compares_sft_final_and_baselines_on_the_same_problems() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let base = [
        "run.steps=2",
        "data.sft_size=40",
        "eval.at_end=true",
        "eval.n=6",
        "eval.samples_per_problem=3",
        "eval.temperature=1.0",
    ];
    run(a.path(), &base, false, None);
    let twin = format!("eval.compare.twin=\"{}\"", a.path().display());
    let missing = "eval.compare.missing=\"/nonexistent/sobre-run\"";
    let mut sets: Vec<&str> = base.to_vec();
    sets.push(&twin);
    sets.push(missing);
    run(b.path(), &sets, false, None);

    let text = std::fs::read_to_string(b.path().join("final_eval.json")).unwrap();
    let cmp: sobre_train::compare::Comparison = serde_json::from_str(&text).unwrap();
    let labels: Vec<&str> = cmp.rows.iter().map(|r| r.label.as_str()).collect();
    // BTreeMap order for the baselines.
    assert_eq!(labels, ["sft", "final", "missing", "twin"]);
    let report = |i: usize| cmp.rows[i].report.clone().unwrap();
    for i in [0, 1, 3] {
        assert_eq!((report(i).n_problems, report(i).samples), (6, 3));
    }
    assert!(cmp.rows[0].model.ends_with("checkpoints/sft"));
    assert!(cmp.rows[1].model.ends_with("checkpoints/step-000002"));
    let (fin, twin) = (report(1), report(3));
    assert_eq!(
        (
            fin.pass_at_1,
            fin.maj_at_k,
            fin.mean_length,
            fin.reward_mean
        ),
        (
            twin.pass_at_1,
            twin.maj_at_k,
            twin.mean_length,
            twin.reward_mean
        )
    );
    assert!(cmp.rows[2].report.is_none());
    assert!(
        cmp.rows[2]
            .note
            .as_deref()
            .is_some_and(|n| n.contains("/nonexistent/sobre-run does not exist")),
        "{:?}",
        cmp.rows[2].note
    );
    let table = cmp.table();
    assert!(table.contains("6 held-out countdown problems"), "{table}");
    // The run's cost is in final_eval.json, and `sobre eval` prints it under the table.
    let cost = cmp
        .cost
        .as_ref()
        .expect("final_eval.json carries the run's cost");
    assert!(cost.tokens_generated > 0 && cost.flops_estimate > 0.0 && cost.cpu_seconds > 0.0);
    let lines = cmp.cost_lines();
    assert!(lines[0].starts_with("cost: "), "{lines:?}");
    assert!(
        lines[2].starts_with("cost per held-out point gained: "),
        "{lines:?}"
    );
    assert_eq!(table.lines().count(), 2 + 4, "{table}");

    // `--resume` on the finished run trains nothing and writes the same table again.
    let before = weights(&b.path().join("checkpoints/step-000002"));
    std::fs::remove_file(b.path().join("final_eval.json")).unwrap();
    let again = run(b.path(), &sets, true, None);
    assert_eq!((again.sft_steps, again.grpo_steps), (2, 2));
    assert!(before == weights(&b.path().join("checkpoints/step-000002")));
    let text2 = std::fs::read_to_string(b.path().join("final_eval.json")).unwrap();
    let cmp2: sobre_train::compare::Comparison = serde_json::from_str(&text2).unwrap();
    let pass1 = |c: &sobre_train::compare::Comparison| -> Vec<Option<f64>> {
        c.rows
            .iter()
            .map(|r| r.report.as_ref().map(|e| e.pass_at_1))
            .collect()
    };
    assert_eq!(pass1(&cmp), pass1(&cmp2));
}

fn config_file(name: &str) -> (String, String) {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../configs")
        .join(name);
    (
        std::fs::read_to_string(&p).expect("a committed config"),
        format!("configs/{name}"),
    )
}

/// The demo and its control differ only in how the time is spent: same tokenizer, model,
/// demonstrations, held-out problems, rewards and evaluation; the control has no GRPO and more
/// SFT steps.
#[test]
fn demo_config_and_its_control_share_everything_but_the_stages() {
    let (text, name) = config_file("r1-tiny.toml");
    let (demo, _) = Config::parse(&text, &name, &[]).unwrap();
    let (text, name) = config_file("r1-tiny-sft-only.toml");
    let (control, _) = Config::parse(&text, &name, &[]).unwrap();
    assert_eq!(demo.model, control.model);
    assert_eq!(demo.tokenizer, control.tokenizer);
    assert_eq!(demo.data, control.data);
    assert_eq!(demo.template, control.template);
    assert_eq!(demo.reward, control.reward);
    assert_eq!(
        (demo.sft.batch_size, demo.sft.lr, demo.sft.max_length),
        (
            control.sft.batch_size,
            control.sft.lr,
            control.sft.max_length
        )
    );
    assert_eq!(demo.run.seed, control.run.seed);
    // Both use the machine's cores the same way.
    assert_eq!(demo.run.data_parallel_size, control.run.data_parallel_size);
    for c in [&demo, &control] {
        assert!(c.eval.at_end);
        assert_eq!(
            (c.eval.n, c.eval.samples_per_problem, c.eval.temperature),
            (300, 4, 1.0)
        );
        assert!(c.data.sft_size.is_some_and(|n| n <= 2000));
    }
    assert_eq!(control.run.steps, 0);
    assert!(demo.run.steps > 0 && control.sft.steps > demo.sft.steps);
    assert_eq!(
        demo.eval.compare.get("control").map(|p| p.as_path()),
        Some(Path::new("runs/r1-tiny-sft-only"))
    );
}

/// The demo config runs end to end (shrunk: a few steps, few problems), keeps its SFT
/// checkpoint, and its table reports the missing control instead of failing.
#[test]
fn demo_config_runs_shrunk_and_keeps_its_sft_checkpoint() {
    let (text, name) = config_file("r1-tiny.toml");
    let dir = tempfile::tempdir().unwrap();
    let sets: Vec<String> = [
        "sft.steps=3",
        "run.steps=2",
        "data.sft_size=40",
        "data.train_size=60",
        "data.eval_size=8",
        "tokenizer.train_samples=100",
        "eval.eval_every=1",
        "eval.n=8",
        "grpo.num_prompts=2",
        "grpo.group_size=4",
        "rollout.max_new_tokens=16",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!(
        "eval.compare.control=\"{}\"",
        dir.path().join("no-control").display()
    )])
    .collect();
    let (cfg, src) = Config::parse(&text, &name, &sets).unwrap();
    let opts = RunOptions {
        out_dir: Some(dir.path().join("run")),
        quiet: true,
        ..Default::default()
    };
    let s = Pipeline::new(cfg, src, opts).unwrap().run().unwrap();
    assert_eq!((s.sft_steps, s.grpo_steps), (3, 2));
    let run = dir.path().join("run");
    assert!(run.join("checkpoints/sft/model.safetensors").exists());
    let cmp: sobre_train::compare::Comparison =
        serde_json::from_str(&std::fs::read_to_string(run.join("final_eval.json")).unwrap())
            .unwrap();
    let labels: Vec<&str> = cmp.rows.iter().map(|r| r.label.as_str()).collect();
    assert_eq!(labels, ["sft", "final", "control"]);
    assert_eq!(cmp.rows[1].report.as_ref().map(|r| r.samples), Some(4));
    assert!(cmp.rows[2].report.is_none());
    // In-run evaluation logged the same keys every step.
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.matches("\"eval/pass@1\"").count(), 2);
}

fn metric_rows(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `run.data_parallel_size` splits every batch over model replicas on their own threads and
/// sums their gradients. Against one replica: every SFT step and the first GRPO step (two
/// mini-batches, KL to the reference, several policy losses) give the same loss and gradient
/// norm to float noise, the same samples, and the SFT checkpoints the same logits. Not later
/// GRPO steps: replicas sum in another order, and AdamW turns a float-noise difference in a
/// near-zero gradient (this random model's, mostly) into a full-size step, so the weights part
/// at the 1e-3 level and the samples soon after. The router's balance loss is the whole
/// batch's (replicas exchange routing totals), so it is covered too. A `regex_match` reward
/// makes the random tiny model's groups differ, so the GRPO gradient is not ~0.
#[test]
fn data_parallel_replicas_follow_the_one_replica_run() {
    let text = format!(
        "{}\n[[reward]]\nname = \"regex_match\"\npattern = \"[0-4]\"\n",
        smoke()
    );
    for (loss, aux, replicas, tol) in [
        ("grpo", 0.0, &[2usize, 3][..], 1e-4f64),
        ("bnpo", 0.0, &[2], 1e-4),
        ("dapo", 0.0, &[2], 1e-4),
        ("grpo", 0.01, &[2, 3], 1e-4),
    ] {
        let all: Vec<usize> = std::iter::once(1).chain(replicas.iter().copied()).collect();
        let mut figures = vec![];
        let mut sft_logits = vec![];
        for &dp in &all {
            let sets: Vec<String> = [
                "sft.steps=3".to_string(),
                "run.steps=1".into(),
                "grpo.mini_batch_size=8".into(),
                format!("model.router_aux_loss_coef={aux}"),
                format!("grpo.loss=\"{loss}\""),
                format!("run.data_parallel_size={dp}"),
            ]
            .into();
            let dir = tempfile::tempdir().unwrap();
            let (cfg, src) = Config::parse(&text, "smoke+regex.toml", &sets).unwrap();
            let opts = RunOptions {
                out_dir: Some(dir.path().to_path_buf()),
                quiet: true,
                ..Default::default()
            };
            let s = Pipeline::new(cfg, src, opts).unwrap().run().unwrap();
            assert_eq!((s.sft_steps, s.grpo_steps), (3, 1), "{loss}, {dp} replicas");
            figures.push(metric_rows(dir.path()));
            let device = sobre_model::default_device();
            let m = sobre_model::load_model(&dir.path().join("checkpoints/sft"), &device).unwrap();
            let probe = sobre_model::Batch::left_padded(&[vec![5u32, 9, 2, 7], vec![3, 4]], 0);
            let logits = m.forward(&probe, None, Default::default()).logits;
            sft_logits.push(logits.try_into_vec_as::<f32>().unwrap());
        }
        for (k, &dp) in all.iter().enumerate().skip(1) {
            for (a, b) in figures[0].iter().zip(&figures[k]) {
                let at = format!("{loss}, {dp} replicas, {} step {}", a["stage"], a["step"]);
                assert_eq!((&a["stage"], &a["step"]), (&b["stage"], &b["step"]), "{at}");
                if a["stage"] == "grpo" && a["step"] != 1 {
                    continue;
                }
                let keys = ["loss", "grad_norm", "aux_loss", "entropy", "kl"];
                for key in keys {
                    let (Some(x), Some(y)) = (a[key].as_f64(), b[key].as_f64()) else {
                        assert_eq!(a[key], b[key], "{at}: {key}");
                        continue;
                    };
                    // Relative, with a floor: GRPO's loss is a sum of O(1) terms that cancel to
                    // ~1e-7 on a first pass, where only the summation order differs.
                    assert!(
                        (x - y).abs() <= tol * x.abs().max(1e-2),
                        "{at}: {key} {x} vs {y}"
                    );
                }
                if a["stage"] == "grpo" {
                    // The same completions were sampled and rewarded.
                    for key in ["reward_mean", "completion_length_mean", "num_groups"] {
                        assert_eq!(a[key], b[key], "{at}: {key}");
                    }
                    assert!(a["reward_std"].as_f64() > Some(0.0), "{at}: no signal");
                }
            }
            let worst = sft_logits[0]
                .iter()
                .zip(&sft_logits[k])
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max);
            assert!(
                worst < tol as f32,
                "{loss}, {dp} replicas: SFT logits differ by {worst}"
            );
        }
    }
}

/// A `command` verifier that starts but dies on every line ends the run after its restarts,
/// with the program's stderr and the checkpoint to resume from (the SFT checkpoint here).
#[test]
fn a_verifier_that_keeps_crashing_stops_the_run_naming_the_last_checkpoint() {
    if sobre_reward::sandbox::resolve_program("python3").is_none() {
        eprintln!("skipped: no python3 on PATH");
        return;
    }
    let text = format!(
        "{}\n[[reward]]\nname = \"command\"\nweight = 1.0\nmax_restarts = 1\ncommand = [\"python3\", \"-c\", \"import sys; sys.stdin.readline(); sys.stderr.write('verifier broke'); sys.exit(3)\"]\n",
        smoke()
    );
    let (cfg, src) = Config::parse(&text, "configs/smoke.toml", &[]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let opts = RunOptions {
        out_dir: Some(dir.path().to_path_buf()),
        quiet: true,
        ..RunOptions::default()
    };
    let err = match Pipeline::new(cfg, src, opts).unwrap().run() {
        Ok(_) => panic!("the run went on with a verifier that cannot score"),
        Err(e) => e.to_string(),
    };
    assert!(err.starts_with("reward: "), "{err}");
    assert!(err.contains("verifier broke"), "{err}");
    let sft = dir.path().join("checkpoints/sft");
    assert!(
        err.contains(&format!("last good checkpoint: {}", sft.display())),
        "{err}"
    );
}

/// `model.frozen_dtype = "bf16"` stores the reference's weight matrices in bf16. At the first
/// GRPO step the policy still is the reference (SFT's checkpoint), so with f32 the step's KL is
/// float noise (observed 1e-14), and with bf16 it is bf16's rounding alone: far above the
/// noise (2e-8) and far below the KL the training itself builds up by the last step (5e-5).
#[test]
fn bf16_reference_shows_its_rounding_as_a_small_first_step_kl() {
    let first_kl = |dtype: &str| {
        let dir = tempfile::tempdir().unwrap();
        let set = format!("model.frozen_dtype=\"{dtype}\"");
        run(dir.path(), &[&set, "grpo.beta=0.04"], false, None);
        let rows: Vec<_> = metric_rows(dir.path())
            .into_iter()
            .filter(|r| r.get("kl").is_some())
            .collect();
        let kl = |r: &serde_json::Value| r["kl"].as_f64().unwrap();
        (kl(&rows[0]), kl(rows.last().unwrap()))
    };
    let (f32_first, f32_last) = first_kl("f32");
    let (bf16_first, _) = first_kl("bf16");
    eprintln!("kl: f32 first {f32_first:e} last {f32_last:e}; bf16 first {bf16_first:e}");
    assert!(f32_first.abs() < 1e-11, "f32 first-step KL {f32_first:e}");
    assert!(
        bf16_first > 1e-10 && bf16_first < f32_last / 100.0,
        "bf16 first-step KL {bf16_first:e} (f32's last {f32_last:e})"
    );
}

/// `sft.gradient_checkpointing` and `grpo.gradient_checkpointing` (layers recomputed in the
/// backward, prompts laid out per completion) follow the plain run: every SFT step and the
/// first GRPO step give the same loss, gradient norm, balance loss, entropy and KL to 1e-4,
/// on the same samples, with the router's balance loss on and two replicas.
#[test]
fn gradient_checkpointing_follows_the_plain_run() {
    let text = format!(
        "{}\n[[reward]]\nname = \"regex_match\"\npattern = \"[0-4]\"\n",
        smoke()
    );
    let mut figures = vec![];
    for on in [false, true] {
        let sets = [
            "sft.steps=3".to_string(),
            "run.steps=1".into(),
            "model.router_aux_loss_coef=0.01".into(),
            "run.data_parallel_size=2".into(),
            format!("sft.gradient_checkpointing={on}"),
            format!("grpo.gradient_checkpointing={on}"),
        ];
        let dir = tempfile::tempdir().unwrap();
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        let s = common::run(&text, "smoke+regex.toml", &sets, dir.path(), false, None);
        assert_eq!((s.sft_steps, s.grpo_steps), (3, 1));
        figures.push(metric_rows(dir.path()));
    }
    assert_eq!(figures[0].len(), figures[1].len());
    for (a, b) in figures[0].iter().zip(&figures[1]) {
        let at = format!("{} step {}", a["stage"], a["step"]);
        for key in ["loss", "grad_norm", "aux_loss", "entropy", "kl"] {
            let (Some(x), Some(y)) = (a[key].as_f64(), b[key].as_f64()) else {
                assert_eq!(a[key], b[key], "{at}: {key}");
                continue;
            };
            assert!(
                (x - y).abs() <= 1e-4 * x.abs().max(1e-2),
                "{at}: {key} {x} vs {y}"
            );
        }
        if a["stage"] == "grpo" {
            for key in ["reward_mean", "completion_length_mean"] {
                assert_eq!(a[key], b[key], "{at}: {key}");
            }
        }
    }
}
