//! `[tools]` in a GRPO run on the tiny preset: completions call the calculator inline, the
//! responses are inserted, masked out of the loss (the rollout/training log-prob mismatch stays
//! at float noise, which it could not with response tokens in it), logged, and a run resumes
//! bit for bit with tools in the loop.

mod common;

use std::path::Path;

use serde_json::Value;
use sobre_train::Config;

/// configs/smoke.toml with an inline "tool" that fires on the R1 tags the model learns first:
/// `<` … `>` calls the calculator with the tag's name, which answers with an error.
fn with_tools() -> String {
    let smoke = common::smoke();
    format!(
        "{smoke}\n[tools]\nformat = \"inline\"\nopen = \"<\"\nclose = \">\"\ntool = \"calculator\"\n\
         response_open = \"[\"\nresponse_close = \"]\"\nmax_calls = 2\noverlap_steps = 2\nmax_response_tokens = 96\n"
    )
}

fn run(dir: &Path, sets: &[&str], stop_after: Option<usize>, resume: bool) {
    common::run(&with_tools(), "tools.toml", sets, dir, resume, stop_after);
}

fn lines(file: &Path) -> Vec<Value> {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

const SETS: [&str; 5] = [
    "sft.steps=12",
    "sft.lr=1e-2",
    "run.steps=4",
    "run.save_every=2",
    "run.samples_per_step=16",
];

#[test]
fn tool_calls_are_answered_masked_logged_and_resumed_exactly() {
    let a = tempfile::tempdir().unwrap();
    run(a.path(), &SETS, None, false);
    let grpo: Vec<Value> = lines(&a.path().join("metrics.jsonl"))
        .into_iter()
        .filter(|m| m["stage"] == "grpo")
        .collect();
    assert_eq!(grpo.len(), 4);
    let calls: f64 = grpo
        .iter()
        .map(|m| m["tools/calls_per_completion"].as_f64().unwrap())
        .sum();
    assert!(
        calls > 0.0,
        "no completion called the tool: the test proves nothing"
    );
    for m in &grpo {
        // Response tokens carry log-prob 0 in the rollout: were they in the loss mask, the mean
        // |training − rollout| log-prob would be far above float noise.
        let mismatch = m["logprob_mismatch"].as_f64().unwrap();
        assert!(mismatch < 1e-4, "logprob_mismatch {mismatch}");
        if m["tools/calls_per_completion"].as_f64().unwrap() > 0.0 {
            assert_eq!(m["tools/error_rate"].as_f64(), Some(1.0), "{m}");
        }
    }
    let samples = lines(&a.path().join("samples.jsonl"));
    let with_calls: Vec<&Value> = samples
        .iter()
        .filter(|s| s["tool_calls"].as_array().is_some_and(|c| !c.is_empty()))
        .collect();
    assert!(!with_calls.is_empty());
    for s in with_calls {
        let c = &s["tool_calls"][0];
        assert_eq!(c["error"], true);
        let response = c["response"].as_str().unwrap();
        assert!(
            response.starts_with("[error: ") && response.ends_with(']'),
            "{response}"
        );
        // The transcript the rewards scored holds the call and its response.
        let text = s["completion"].as_str().unwrap();
        let call = c["call"].as_str().unwrap();
        // (The response follows the token that closed the call, which may carry a few
        // characters past the `>`.)
        let closed = text
            .find(&format!("<{call}>"))
            .expect("the call in the transcript")
            + call.len()
            + 2;
        let at = text[closed..]
            .find(response)
            .expect("the response after the call");
        assert!(at <= 8, "{text}");
    }

    // Evaluation runs with the run's tools: the held-out completions call them too.
    let sets: Vec<String> = SETS.iter().map(|s| s.to_string()).collect();
    let (cfg, _) = Config::parse(&with_tools(), "tools.toml", &sets).unwrap();
    let ckpt = a.path().join("checkpoints/step-000004");
    let (model, tok, _) = sobre_train::compare::load_for_eval(&ckpt, None).unwrap();
    let template = sobre_train::data::build_template(&cfg, Some(&ckpt)).unwrap();
    let rewards = cfg.build_rewards().unwrap();
    let problems = sobre_train::eval::heldout_problems(&cfg, Some(8), None).unwrap();
    let mut opts = sobre_train::eval::EvalOptions::from_config(&cfg);
    opts.samples = 4;
    opts.temperature = 1.0;
    assert!(opts.tools.is_some());
    let out =
        sobre_train::eval::evaluate(&model, &tok, &problems, &template, &rewards, &opts).unwrap();
    assert!(
        out.samples
            .iter()
            .any(|s| s.completion.contains("[error: ")),
        "no held-out completion was answered by the tool"
    );
    opts.tools = None;
    let plain =
        sobre_train::eval::evaluate(&model, &tok, &problems, &template, &rewards, &opts).unwrap();
    assert!(
        plain
            .samples
            .iter()
            .all(|s| !s.completion.contains("[error: "))
    );

    let b = tempfile::tempdir().unwrap();
    run(b.path(), &SETS, Some(2), false);
    run(b.path(), &SETS, None, true);
    let w = |d: &Path| std::fs::read(d.join("checkpoints/step-000004/model.safetensors")).unwrap();
    assert!(
        w(a.path()) == w(b.path()),
        "weights differ after a resume with tools"
    );
}

#[test]
fn bad_tool_tables_are_config_errors_naming_the_key() {
    let good = with_tools();
    let line = good.lines().position(|l| l.starts_with("[tools]")).unwrap() + 1;
    for (from, to, key, at) in [
        (
            "format = \"inline\"",
            "format = \"xml\"",
            "tools.format",
            line + 1,
        ),
        (
            "tool = \"calculator\"",
            "tool = \"search\"",
            "tools.tool",
            line + 4,
        ),
        (
            "max_calls = 2",
            "max_calls = 0",
            "tools.max_calls",
            line + 7,
        ),
    ] {
        let err = Config::parse(&good.replace(from, to), "tools.toml", &[])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains(key) && err.contains(&format!("tools.toml:{at}")),
            "{to}: {err}"
        );
    }
}

/// configs/r1-tiny-tools.toml is r1-tiny's recipe with the calculator: the same problems,
/// rewards, GRPO and evaluation; search-trace demonstrations computed with the inline
/// calculator (room for all their calls), whose markers the tokenizer keeps whole.
#[test]
fn the_tools_demo_is_r1_tiny_with_a_calculator() {
    use sobre_data::tasks::countdown::{CountdownConfig, DemoStyle};
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let load = |f: &str| Config::load(&root.join("configs").join(f), &[]).unwrap().0;
    let (tiny, tools) = (load("r1-tiny.toml"), load("r1-tiny-tools.toml"));
    assert_eq!(
        (&tools.grpo, &tools.reward, &tools.optim),
        (&tiny.grpo, &tiny.reward, &tiny.optim)
    );
    // The same sampling, with room for the longer traces.
    let sampling = sobre_rollout::SamplingParams {
        max_new_tokens: tiny.rollout.max_new_tokens,
        ..tools.rollout.clone()
    };
    assert_eq!(sampling, tiny.rollout);
    assert_eq!(
        (tools.sft.steps, tools.run.steps),
        (tiny.sft.steps, tiny.run.steps)
    );
    assert_eq!((tools.eval.n, tools.eval.samples_per_problem), (300, 4));
    let (a, b) = (tools.data.countdown.clone(), tiny.data.countdown.clone());
    assert!(a.calculator && !b.calculator);
    assert_eq!((a.demo, a.max_misses), (DemoStyle::Search, 2));
    let plain = CountdownConfig {
        calculator: false,
        demo: b.demo,
        max_misses: b.max_misses,
        ..a.clone()
    };
    assert_eq!(plain, b);
    let t = tools.tools.as_ref().unwrap();
    assert_eq!(
        (t.format.as_str(), t.open.as_str(), t.close.as_str()),
        ("inline", "<calc>", "</calc>")
    );
    // A search trace makes up to (max_misses + 1) × (numbers − 1) calls: all answered.
    assert!(t.max_calls >= (a.max_misses + 1) * (a.max_count - 1));
    for m in ["<calc>", "</calc>", "<result>", "</result>"] {
        assert!(tools.tokenizer.added_tokens.iter().any(|x| x == m), "{m}");
    }
}
