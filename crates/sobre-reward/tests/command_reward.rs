//! The `command` reward with `examples/verifier.py` and with verifiers that crash, hang or
//! answer nonsense. Skipped (with a printed reason) where `python3` is absent.

use serde_json::{Value, json};
use sobre_reward::sandbox::resolve_program;
use sobre_reward::{CombinedReward, Completion, Sample};
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn python() -> Option<String> {
    let p = resolve_program("python3").map(|p| p.display().to_string());
    if p.is_none() {
        eprintln!("skipped: python3 not found");
    }
    p
}

fn verifier_example() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/verifier.py")
}

fn sample(v: Value) -> Sample {
    match v {
        Value::Object(m) => m,
        _ => panic!("sample must be an object"),
    }
}

/// A verifier script in a temporary directory, and the `[[reward]]` table that runs it.
fn script(dir: &tempfile::TempDir, name: &str, body: &str, extra: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, body).unwrap();
    let py = python().unwrap_or_default();
    format!(
        "[[reward]]\nname = \"command\"\ncommand = [{py:?}, {:?}]\n{extra}",
        path.display().to_string()
    )
}

#[test]
fn example_verifier_components_are_logged() {
    let Some(py) = python() else { return };
    let toml = format!(
        "[[reward]]\nname = \"command\"\nweight = 2.0\ncommand = [{py:?}, {:?}]\ncomponents = [\"correct\", \"short\"]\n\
         [[reward]]\nname = \"format\"\nmode = \"lenient\"\n",
        verifier_example().display().to_string()
    );
    let r = CombinedReward::from_toml(&toml).unwrap();
    assert_eq!(
        r.names(),
        vec!["command", "command/correct", "command/short", "format"]
    );
    let s = sample(json!({"prompt": "2+2?", "answer": "4"}));
    let long = format!(
        "<think>{}</think><answer>5</answer><answer>4</answer>",
        "x".repeat(300)
    );
    let items = [
        (&s, Completion::new("<think>easy</think><answer>4</answer>")),
        (&s, Completion::new("the answer is 5")),
        (&s, Completion::new(&long)),
    ];
    let out = r.score_batch(&items).unwrap();
    let comps = |i: usize| {
        out[i]
            .components
            .iter()
            .map(|(_, v)| *v)
            .collect::<Vec<_>>()
    };
    assert_eq!(comps(0), vec![Some(1.1), Some(1.0), Some(0.1), Some(1.0)]);
    assert_eq!(out[0].total, 2.0 * 1.1 + 1.0);
    assert_eq!(comps(1), vec![Some(0.1), Some(0.0), Some(0.1), Some(0.0)]);
    assert_eq!(comps(2), vec![Some(1.0), Some(1.0), Some(0.0), Some(1.0)]);
    // One at a time gives the same.
    assert_eq!(r.score(items[1].0, &items[1].1), out[1]);
}

#[test]
fn single_reward_replies_and_parallel_processes() {
    let Some(_) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let body = "import json, sys, time\nfor line in sys.stdin:\n    r = json.loads(line)\n    time.sleep(0.05)\n    \
                v = None if r['completion'] == 'skip' else len(r['completion']) / 10\n    \
                print(json.dumps({'reward': v}), flush=True)\n";
    let r = CombinedReward::from_toml(&script(&dir, "len.py", body, "processes = 4")).unwrap();
    let s = sample(json!({"answer": "x"}));
    let texts: Vec<String> = (0..16)
        .map(|i| "a".repeat(i))
        .chain(["skip".to_string()])
        .collect();
    let items: Vec<(&Sample, Completion<'_>)> =
        texts.iter().map(|t| (&s, Completion::new(t))).collect();
    let t = Instant::now();
    let out = r.score_batch(&items).unwrap();
    let elapsed = t.elapsed();
    for (i, b) in out.iter().take(16).enumerate() {
        assert_eq!(b.components[0].1, Some(i as f32 / 10.0));
    }
    assert_eq!(out[16].components[0].1, None);
    assert_eq!(out[16].total, 0.0);
    // 17 × 50 ms over 4 processes (plus starting 3 of them).
    assert!(elapsed < Duration::from_millis(800), "{elapsed:?}");
}

#[test]
fn crashes_restart_then_fail_with_stderr() {
    let Some(_) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    // Answers one request, then exits: every request after the first needs a restart.
    let once = "import json, sys\nline = sys.stdin.readline()\nprint(json.dumps({'reward': 1}), flush=True)\n";
    let r = CombinedReward::from_toml(&script(&dir, "once.py", once, "max_restarts = 1")).unwrap();
    let s = Sample::new();
    let items: Vec<(&Sample, Completion<'_>)> =
        (0..4).map(|_| (&s, Completion::new("x"))).collect();
    let out = r.score_batch(&items).unwrap();
    assert!(out.iter().all(|b| b.total == 1.0), "{out:?}");
    // Always dies: after max_restarts restarts, an error with the end of its stderr.
    let dies = "import sys\nsys.stdin.readline()\nprint('verifier exploded: boom', file=sys.stderr)\nsys.exit(3)\n";
    let r = CombinedReward::from_toml(&script(&dir, "dies.py", dies, "max_restarts = 2")).unwrap();
    let e = r.score_batch(&items[..1]).unwrap_err().to_string();
    assert!(e.contains("failed 3 time(s) in a row"), "{e}");
    assert!(e.contains("verifier exploded: boom"), "{e}");
    // The infallible path scores null instead.
    assert_eq!(r.score(&s, &Completion::new("x")).components[0].1, None);
}

#[test]
fn malformed_replies_name_the_line() {
    let Some(_) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let chatty =
        "import sys\nfor line in sys.stdin:\n    print('thinking about it...', flush=True)\n";
    let r = CombinedReward::from_toml(&script(&dir, "chatty.py", chatty, "")).unwrap();
    let s = Sample::new();
    let e = r
        .score_batch(&[(&s, Completion::new("x"))])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("malformed reply to request 1") && e.contains("`thinking about it...`"),
        "{e}"
    );
    let undeclared =
        "import sys\nfor line in sys.stdin:\n    print('{\"rewards\": {\"zz\": 1}}', flush=True)\n";
    let r = CombinedReward::from_toml(&script(&dir, "zz.py", undeclared, "components = [\"a\"]"))
        .unwrap();
    let e = r
        .score_batch(&[(&s, Completion::new("x"))])
        .unwrap_err()
        .to_string();
    assert!(e.contains("component `zz`"), "{e}");
}

#[test]
fn timeouts_and_start_up_errors() {
    let Some(_) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let hangs = "import sys, time\nfor line in sys.stdin:\n    time.sleep(60)\n";
    let r = CombinedReward::from_toml(&script(
        &dir,
        "hangs.py",
        hangs,
        "timeout_s = 0.3\nmax_restarts = 1",
    ))
    .unwrap();
    let s = Sample::new();
    let t = Instant::now();
    let e = r
        .score_batch(&[(&s, Completion::new("x"))])
        .unwrap_err()
        .to_string();
    assert!(e.contains("no reply within the timeout"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let e = CombinedReward::from_toml(
        "[[reward]]\nname = \"command\"\ncommand = [\"/no/such/verifier\"]",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("`command`") && e.contains("/no/such/verifier"),
        "{e}"
    );
    let e = CombinedReward::from_toml("[[reward]]\nname = \"command\"")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("parameter `command`") && e.contains("required"),
        "{e}"
    );
    let e = CombinedReward::from_toml(
        "[[reward]]\nname = \"command\"\ncommand = [\"true\"]\ntimeout = 1",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("`timeout`"), "{e}");
}

/// A large completion (bigger than a pipe buffer) goes through to a verifier that answers
/// with its length.
#[test]
fn large_requests() {
    let Some(_) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let body = "import json, sys\nfor line in sys.stdin:\n    print(json.dumps({'reward': len(json.loads(line)['completion'])}), flush=True)\n";
    let r = CombinedReward::from_toml(&script(&dir, "big.py", body, "")).unwrap();
    let big = "y".repeat(1 << 20);
    let s = Sample::new();
    assert_eq!(r.score(&s, &Completion::new(&big)).total, (1 << 20) as f32);
}
