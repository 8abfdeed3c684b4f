//! `[[stage]]` runs on the tiny preset: R1's four stages in one run directory, rejection
//! sampling's file, and exact resume at a stage boundary and inside a stage.

mod common;

use std::path::Path;

use sobre_train::Config;
use sobre_train::pipeline::{Pipeline, RunOptions, Summary};

/// configs/smoke.toml without its step counts, with R1's stages.
fn staged() -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/smoke.toml");
    let smoke = std::fs::read_to_string(p).expect("configs/smoke.toml");
    let mut out = String::new();
    for line in smoke.lines() {
        if line.trim_start().starts_with("steps =") {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out.push_str(concat!(
        "at_end = true\nsamples_per_problem = 2\n",
        "[[stage]]\nname = \"cold_start\"\nkind = \"sft\"\n[stage.sft]\nsteps = 2\n",
        "[[stage]]\nname = \"reasoning_rl\"\nkind = \"grpo\"\n[stage.run]\nsteps = 2\n",
        "[[stage]]\nname = \"rejection\"\nkind = \"rejection_sampling\"\nn = 4\nk = 2\nthreshold = 0.0\nprompts = 8\n",
        "[[stage]]\nname = \"sft_again\"\nkind = \"sft\"\n[stage.sft]\nsteps = 2\n",
        "[[stage]]\nname = \"rl_again\"\nkind = \"grpo\"\n[stage.run]\nsteps = 2\n[stage.optim]\nlr = 5e-4\n",
    ));
    out
}

fn run(dir: &Path, resume: bool, stop_after: Option<usize>) -> Summary {
    run_text(&staged(), dir, resume, stop_after)
}

fn run_text(text: &str, dir: &Path, resume: bool, stop_after: Option<usize>) -> Summary {
    common::run(text, "staged.toml", &["eval.n=4"], dir, resume, stop_after)
}

fn weights(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("model.safetensors")).unwrap()
}

const TRAINED: [&str; 4] = ["cold_start", "reasoning_rl", "sft_again", "rl_again"];

#[test]
fn four_stages_run_in_order_and_resume_bit_for_bit() {
    let a = tempfile::tempdir().unwrap();
    let s = run(a.path(), false, None);
    assert!(!s.interrupted);
    assert_eq!((s.sft_steps, s.grpo_steps), (4, 4));
    assert_eq!(
        s.last_checkpoint.as_deref(),
        Some(a.path().join("checkpoints/rl_again").as_path())
    );
    for name in TRAINED {
        let st = sobre_train::checkpoint::read_state(&a.path().join("checkpoints").join(name));
        assert!(st.is_some(), "checkpoints/{name}");
    }
    // Each stage changed the model.
    let w: Vec<Vec<u8>> = TRAINED
        .iter()
        .map(|n| weights(&a.path().join("checkpoints").join(n)))
        .collect();
    for i in 1..w.len() {
        assert!(w[i] != w[i - 1], "{} left the model as it was", TRAINED[i]);
    }

    // Rejection sampling: 8 prompts × 4 samples, every one passes threshold 0; at most 2
    // distinct completions per prompt kept, each with its problem's fields.
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(a.path().join("stages/rejection/rejection.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(report["prompts"], 8);
    assert_eq!(report["sampled"], 32);
    assert_eq!(report["passed"], 32);
    let file = std::fs::read_to_string(a.path().join("stages/rejection/sft.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = file
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len() as u64, report["kept"].as_u64().unwrap());
    // Every prompt kept at least one completion (all pass): kept + duplicates covers 8 prompts.
    assert!(rows.len() >= 8, "{} rows", rows.len());
    let mut per_prompt: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for r in &rows {
        assert!(r["nums"].is_array() && r["target"].is_number(), "{r}");
        per_prompt
            .entry(r["prompt"].to_string())
            .or_default()
            .push(r["completion"].as_str().unwrap().to_string());
    }
    assert_eq!(
        per_prompt.len() as u64,
        report["prompts_kept"].as_u64().unwrap()
    );
    for (p, c) in &per_prompt {
        assert!(c.len() <= 2, "{p}: {c:?}");
        assert!(c.len() < 2 || c[0] != c[1], "{p}: duplicates kept");
    }
    // The second SFT stage trained on that file.
    let cfg = std::fs::read_to_string(a.path().join("stages/sft_again/config.toml")).unwrap();
    assert!(cfg.contains("stages/rejection/sft.jsonl"), "{cfg}");
    // RUN/metrics.jsonl: each finished stage's lines, in order, tagged with the stage.
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(a.path().join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let tags: Vec<(String, String)> = lines
        .iter()
        .map(|l| {
            (
                l["pipeline_stage"].as_str().unwrap().to_string(),
                l["stage"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want: Vec<(String, String)> = [
        ("cold_start", "sft"),
        ("reasoning_rl", "grpo"),
        ("sft_again", "sft"),
        ("rl_again", "grpo"),
    ]
    .iter()
    .flat_map(|(n, k)| std::iter::repeat_n((n.to_string(), k.to_string()), 2))
    .collect();
    assert_eq!(tags, want);
    // A row per training stage.
    let eval: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.path().join("final_eval.json")).unwrap())
            .unwrap();
    let labels: Vec<&str> = eval["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels, TRAINED);
    for r in eval["rows"].as_array().unwrap() {
        assert_eq!(r["report"]["n_problems"], 4, "{r}");
    }

    // Stopped inside the first GRPO stage, then resumed: the same models, stage by stage.
    let b = tempfile::tempdir().unwrap();
    let first = run(b.path(), false, Some(1));
    assert!(first.interrupted);
    assert!(b.path().join("checkpoints/cold_start").exists());
    assert!(!b.path().join("checkpoints/reasoning_rl").exists());
    let done = run(b.path(), true, None);
    assert!(!done.interrupted);
    for name in TRAINED {
        let p = Path::new("checkpoints").join(name);
        assert!(
            weights(&a.path().join(&p)) == weights(&b.path().join(&p)),
            "{name} differs after a mid-stage resume"
        );
    }
    assert_eq!(
        std::fs::read(a.path().join("stages/rejection/sft.jsonl")).unwrap(),
        std::fs::read(b.path().join("stages/rejection/sft.jsonl")).unwrap()
    );

    // Stopped at a stage boundary (before the first GRPO step), then resumed.
    let c = tempfile::tempdir().unwrap();
    assert!(run(c.path(), false, Some(0)).interrupted);
    run(c.path(), true, None);
    let p = Path::new("checkpoints/rl_again");
    assert!(
        weights(&a.path().join(p)) == weights(&c.path().join(p)),
        "differs after a boundary resume"
    );
    // A finished staged run resumed again trains nothing more.
    let again = run(c.path(), true, None);
    assert_eq!((again.sft_steps, again.grpo_steps), (4, 4));
    assert!(weights(&a.path().join(p)) == weights(&c.path().join(p)));
}

/// `[lora]` with stages: every stage trains the same adapters on the one frozen base the first
/// stage wrote, rejection sampling and the table load them on it, and a run stopped inside a
/// stage resumes to the same adapters.
#[test]
fn lora_stages_continue_one_adapter_on_one_base_and_resume_exactly() {
    let text = format!(
        "{}[lora]\nr = 4\nalpha = 8\ntarget_modules = [\"q_proj\", \"v_proj\", \"o_proj\"]\n",
        staged()
    );
    let adapters = |dir: &Path, name: &str| {
        std::fs::read(
            dir.join("checkpoints")
                .join(name)
                .join("adapter_model.safetensors"),
        )
        .unwrap()
    };
    let a = tempfile::tempdir().unwrap();
    let s = run_text(&text, a.path(), false, None);
    assert_eq!((s.sft_steps, s.grpo_steps), (4, 4));
    let base = a.path().join("stages/cold_start/base/model.safetensors");
    let base_bytes = std::fs::read(&base).unwrap();
    for (i, name) in TRAINED.iter().enumerate() {
        let ckpt = a.path().join("checkpoints").join(name);
        assert!(
            !ckpt.join("model.safetensors").exists(),
            "{name} holds a full model"
        );
        let (_, named) = sobre_model::lora::read_adapter_config(&ckpt).unwrap();
        let named = std::fs::canonicalize(named.unwrap()).unwrap();
        assert_eq!(
            named,
            std::fs::canonicalize(base.parent().unwrap()).unwrap(),
            "{name}"
        );
        if i > 0 {
            assert!(
                adapters(a.path(), name) != adapters(a.path(), TRAINED[i - 1]),
                "{name} left the adapters as they were"
            );
            // Later stages write no base of their own.
            assert!(
                !a.path().join("stages").join(name).join("base").exists(),
                "{name}"
            );
        }
    }
    let cfg = std::fs::read_to_string(a.path().join("stages/sft_again/config.toml")).unwrap();
    assert!(
        cfg.contains("checkpoints/reasoning_rl"),
        "sft_again continues rl's adapter: {cfg}"
    );
    assert!(
        std::fs::read(&base).unwrap() == base_bytes,
        "the base changed"
    );
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(a.path().join("stages/rejection/rejection.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(report["sampled"], 32);
    let eval: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.path().join("final_eval.json")).unwrap())
            .unwrap();
    let rows = eval["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 4);
    for r in rows {
        assert_eq!(r["report"]["n_problems"], 4, "{r}");
    }

    let b = tempfile::tempdir().unwrap();
    assert!(run_text(&text, b.path(), false, Some(1)).interrupted);
    run_text(&text, b.path(), true, None);
    for name in TRAINED {
        assert!(
            adapters(a.path(), name) == adapters(b.path(), name),
            "{name} differs after a mid-stage resume"
        );
    }
}

#[test]
fn a_staged_run_will_not_overwrite_another_without_resume() {
    let (cfg, src) = Config::parse(&staged(), "staged.toml", &[]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("stages/cold_start")).unwrap();
    let opts = RunOptions {
        out_dir: Some(dir.path().to_path_buf()),
        quiet: true,
        ..Default::default()
    };
    let e = Pipeline::new(cfg, src, opts)
        .unwrap()
        .run()
        .unwrap_err()
        .to_string();
    assert!(e.contains("--resume"), "{e}");
}

/// configs/r1-tiny-full.toml loads, runs R1's stages in order, and shares r1-tiny's settings
/// (so the two compare on the same evaluation).
#[test]
fn the_full_pipeline_config_is_r1_tiny_with_stages() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let (full, src) = Config::load(&root.join("configs/r1-tiny-full.toml"), &[]).unwrap();
    let (tiny, _) = Config::load(&root.join("configs/r1-tiny.toml"), &[]).unwrap();
    let plan = sobre_train::stages::plan(&full, &src).unwrap();
    let names: Vec<&str> = plan.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "cold_start",
            "reasoning_rl",
            "rejection",
            "sft_again",
            "rl_again"
        ]
    );
    assert_eq!(full.data, tiny.data);
    assert_eq!(full.grpo, tiny.grpo);
    assert_eq!(full.rollout, tiny.rollout);
    assert_eq!(full.reward, tiny.reward);
    assert_eq!(
        (full.eval.n, full.eval.samples_per_problem),
        (tiny.eval.n, tiny.eval.samples_per_problem)
    );
    let cold =
        sobre_train::stages::stage_config(&full, &plan[0], None, None, Path::new("o")).unwrap();
    assert_eq!(cold.sft, tiny.sft);
    // GRPO steps of the two RL stages: 550 + 250 of r1-tiny's 850.
    let rl: usize = plan
        .iter()
        .filter(|s| s.kind == sobre_train::stages::StageKind::Grpo)
        .map(|s| {
            sobre_train::stages::stage_config(&full, s, None, None, Path::new("o"))
                .unwrap()
                .run
                .steps
        })
        .sum();
    assert_eq!((rl, tiny.run.steps), (800, 850));
}

/// The distillation demo's configs (scripts/distill-demo.sh): the student is r1-tiny's model
/// made narrower, the baseline is r1-tiny's recipe on it, the distilled student is SFT alone on
/// the traces, and all three evaluate on r1-tiny's held-out problems.
#[test]
fn the_distillation_configs_are_r1_tiny_with_a_smaller_student() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let load =
        |f: &str, sets: &[String]| Config::load(&root.join("configs").join(f), sets).unwrap().0;
    // (The traces file is the teacher's output; one row stands in for it.)
    let traces = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        traces.path(),
        "{\"prompt\": \"1 2 3 = 6\", \"completion\": \"<answer>1+2+3</answer>\"}\n",
    )
    .unwrap();
    let at = format!("data.sft_dataset.path=\"{}\"", traces.path().display());
    let (tiny, student, distill) = (
        load("r1-tiny.toml", &[]),
        load("r1-tiny-student.toml", &[]),
        load("r1-tiny-distill.toml", &[at]),
    );
    let teacher_shape = tiny.model.preset_shape().unwrap();
    let student_shape = student.model.preset_shape().unwrap();
    assert_eq!(student.model, distill.model);
    assert_eq!(
        (teacher_shape.hidden_size, student_shape.hidden_size),
        (128, 64)
    );
    assert_eq!(student.sft, tiny.sft);
    assert_eq!(
        (
            &student.grpo,
            &student.rollout,
            &student.reward,
            &student.optim
        ),
        (&tiny.grpo, &tiny.rollout, &tiny.reward, &tiny.optim)
    );
    assert_eq!(student.data, tiny.data);
    assert_eq!((distill.run.steps, distill.sft.steps), (0, 1500));
    assert!(distill.data.sft_dataset.is_some());
    for c in [&student, &distill] {
        assert_eq!(c.data.countdown, tiny.data.countdown);
        assert_eq!(
            (
                c.data.eval_size,
                c.eval.n,
                c.eval.samples_per_problem,
                c.run.seed
            ),
            (
                tiny.data.eval_size,
                tiny.eval.n,
                tiny.eval.samples_per_problem,
                tiny.run.seed
            )
        );
        assert_eq!(c.template, tiny.template);
    }
}
