//! The `code` reward on committed (problem, solution, verdict) cases, and on hostile programs:
//! each must score 0 within its time limit while this test process lives on.
//!
//! Skipped (with a printed reason) where `python3` is absent.

use serde_json::{Value, json};
use sobre_reward::sandbox::resolve_program;
use sobre_reward::{CombinedReward, Completion, Reward, Sample, build_reward};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Hostile tests run one at a time (they count processes and time themselves).
static SERIAL: Mutex<()> = Mutex::new(());

fn have_python() -> bool {
    let ok = resolve_program("python3").is_some();
    if !ok {
        eprintln!("skipped: python3 not found");
    }
    ok
}

fn reward(params: Value) -> Box<dyn Reward> {
    let Value::Object(p) = params else {
        panic!("params must be an object")
    };
    build_reward("code", &p).unwrap()
}

fn sample(v: Value) -> Sample {
    match v {
        Value::Object(m) => m,
        _ => panic!("sample must be an object"),
    }
}

fn aplusb() -> Sample {
    sample(json!({"input_output": {"inputs": ["1 2\n"], "outputs": ["3\n"]}}))
}

fn py(code: &str) -> String {
    format!("```python\n{code}\n```")
}

#[test]
fn committed_cases_all_agree() {
    if !have_python() {
        return;
    }
    let text = include_str!("fixtures/code_cases.jsonl");
    let r = reward(json!({"timeout_s": 3.0}));
    let cases: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(cases.len() >= 20, "{}", cases.len());
    let samples: Vec<Sample> = cases.iter().map(|c| sample(c["sample"].clone())).collect();
    let items: Vec<(&Sample, Completion<'_>)> = cases
        .iter()
        .zip(&samples)
        .map(|(c, s)| (s, Completion::new(c["completion"].as_str().unwrap())))
        .collect();
    let t = Instant::now();
    let scores = r.score_batch(&items).unwrap();
    println!("{} cases in {:?} (batched)", cases.len(), t.elapsed());
    let mut wrong = Vec::new();
    for (c, s) in cases.iter().zip(&scores) {
        let want = c["score"].as_f64().map(|x| x as f32);
        let agree = match (want, s.value) {
            (Some(w), Some(g)) => (w - g).abs() < 1e-4,
            (None, None) => true,
            _ => false,
        };
        if !agree {
            wrong.push(format!("{}: want {want:?}, got {:?}", c["id"], s.value));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    // One by one agrees with the batch.
    for (i, (s, c)) in items.iter().enumerate().take(5) {
        assert_eq!(r.score(s, c), scores[i].value, "{}", cases[i]["id"]);
    }
}

#[test]
fn parameters() {
    if !have_python() {
        return;
    }
    let s = sample(
        json!({"input_output": {"inputs": ["1", "2", "3"], "outputs": ["1", "2", "0.3333333"]}}),
    );
    let code = py("import sys\nprint({'1': 1, '2': 2}.get(sys.stdin.read(), 1/3))");
    // The third test prints 0.3333333333333333: it needs a float tolerance.
    let frac = reward(json!({}));
    assert_eq!(frac.score(&s, &Completion::new(&code)), Some(2.0 / 3.0));
    let tol = reward(json!({"float_tolerance": 1e-6}));
    assert_eq!(tol.score(&s, &Completion::new(&code)), Some(1.0));
    let all = reward(json!({"all_or_nothing": true}));
    assert_eq!(all.score(&s, &Completion::new(&code)), Some(0.0));
    let all_tol = reward(json!({"all_or_nothing": true, "float_tolerance": 1e-6}));
    assert_eq!(all_tol.score(&s, &Completion::new(&code)), Some(1.0));
    let first = reward(json!({"max_tests": 1}));
    assert_eq!(first.score(&s, &Completion::new(&code)), Some(1.0));
    // Field names are parameters.
    let renamed = reward(json!({"input_output_field": "tests"}));
    let s2 = sample(json!({"tests": {"inputs": ["4"], "outputs": ["16"]}}));
    assert_eq!(
        renamed.score(&s2, &Completion::new(&py("print(int(input())**2)"))),
        Some(1.0)
    );
}

#[test]
fn config_errors_name_the_key() {
    let e = CombinedReward::from_toml(
        "[[reward]]\nname = \"code\"\ninterpreter = [\"no-such-python-xyz\"]",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("`code`") && e.contains("`interpreter`") && e.contains("no-such-python-xyz"),
        "{e}"
    );
    let e = CombinedReward::from_toml("[[reward]]\nname = \"code\"\ntimeout_s = -1")
        .unwrap_err()
        .to_string();
    assert!(e.contains("`timeout_s`"), "{e}");
    let e = CombinedReward::from_toml("[[reward]]\nname = \"code\"\ntimeout = 3")
        .unwrap_err()
        .to_string();
    assert!(e.contains("`timeout`"), "{e}");
    let e = CombinedReward::from_toml("[[reward]]\nname = \"code\"\nmemory_mb = \"lots\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("`memory_mb`"), "{e}");
    // An interpreter that exists but cannot run an empty program.
    let e = CombinedReward::from_toml("[[reward]]\nname = \"code\"\ninterpreter = [\"false\"]")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`interpreter`") && e.contains("empty program"),
        "{e}"
    );
}

/// A batch of 16 completions of 2 tests each with 4 workers takes about a quarter of the time
/// of running them one at a time (measured as: much less than serial).
#[test]
fn batches_run_in_parallel() {
    if !have_python() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = sample(json!({"input_output": {"inputs": ["", ""], "outputs": ["ok", "ok"]}}));
    let code = py("import time\ntime.sleep(0.25)\nprint('ok')");
    let items: Vec<(&Sample, Completion<'_>)> =
        (0..16).map(|_| (&s, Completion::new(&code))).collect();
    let r = reward(json!({"max_concurrency": 8}));
    let t = Instant::now();
    let out = r.score_batch(&items).unwrap();
    let elapsed = t.elapsed();
    assert!(out.iter().all(|x| x.value == Some(1.0)), "{out:?}");
    // Serial: 32 × 0.25 s = 8 s; 8 at a time: ≈ 1 s plus start-up.
    assert!(elapsed < Duration::from_secs(4), "{elapsed:?}");
}

/// Run a hostile program as a completion; it must score 0 within `limit`.
fn hostile(r: &dyn Reward, s: &Sample, code: &str, limit: Duration) -> Duration {
    let t = Instant::now();
    let score = r.score(s, &Completion::new(&py(code)));
    let elapsed = t.elapsed();
    assert_eq!(score, Some(0.0), "{code}");
    assert!(elapsed < limit, "{code}: took {elapsed:?}");
    elapsed
}

fn hostile_reward() -> Box<dyn Reward> {
    reward(json!({"timeout_s": 2.0, "memory_mb": 512, "max_processes": 16, "max_output_mb": 4}))
}

/// Processes whose cwd is a sandbox directory (a run's leftovers).
fn sandbox_processes() -> Vec<String> {
    let prefix = std::env::temp_dir().join("sobre-sandbox-");
    let prefix = prefix.to_string_lossy().to_string();
    let mut found = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            if let Ok(cwd) = std::fs::read_link(e.path().join("cwd"))
                && cwd.to_string_lossy().starts_with(&prefix)
            {
                found.push(e.file_name().to_string_lossy().to_string());
            }
        }
    }
    found
}

#[test]
fn infinite_loop_scores_zero_in_time() {
    if !have_python() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let r = hostile_reward();
    let t = hostile(
        r.as_ref(),
        &aplusb(),
        "while True:\n    pass",
        Duration::from_secs(5),
    );
    println!("infinite loop: {t:?}");
    let t = hostile(
        r.as_ref(),
        &aplusb(),
        "import time\ntime.sleep(100)",
        Duration::from_secs(5),
    );
    println!("sleep: {t:?}");
}

#[test]
fn fork_bomb_scores_zero_and_leaves_nothing() {
    if !have_python() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let r = hostile_reward();
    let bomb =
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass";
    let t = hostile(r.as_ref(), &aplusb(), bomb, Duration::from_secs(6));
    println!("fork bomb: {t:?}");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(sandbox_processes(), Vec::<String>::new());
    // A child that leaves the process group and keeps stdout open does not stall the run.
    let escape =
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nprint(3)";
    let t = Instant::now();
    let score = r.score(&aplusb(), &Completion::new(&py(escape)));
    println!("setsid escapee: {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(score.is_some());
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(sandbox_processes(), Vec::<String>::new());
}

#[test]
fn huge_allocation_and_huge_output_score_zero() {
    if !have_python() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let r = hostile_reward();
    let t = hostile(
        r.as_ref(),
        &aplusb(),
        "x = bytearray(10 * 1024 ** 3)\nprint(3)",
        Duration::from_secs(5),
    );
    println!("10 GB allocation: {t:?}");
    let t = hostile(
        r.as_ref(),
        &aplusb(),
        "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(chunk)",
        Duration::from_secs(5),
    );
    println!("printing 1 GB: {t:?}");
}

#[test]
fn writes_outside_the_sandbox_fail() {
    if !have_python() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mine = tempfile::tempdir().unwrap();
    let inside = mine.path().join("escape.txt");
    let tmp = std::env::temp_dir().join(format!("sobre-escape-{}.txt", std::process::id()));
    let cwd = std::env::current_dir()
        .unwrap()
        .join(format!("sobre-escape-{}.txt", std::process::id()));
    let code = format!(
        "escaped = []\nfor p in [{:?}, {:?}, {:?}]:\n    try:\n        open(p, 'w').write('x')\n        escaped.append(p)\n    except OSError:\n        pass\nprint('escaped' if escaped else 'contained')\nopen('local.txt', 'w').write('fine')",
        inside.display().to_string(),
        tmp.display().to_string(),
        cwd.display().to_string()
    );
    let s = sample(json!({"input_output": {"inputs": [""], "outputs": ["contained"]}}));
    let r = hostile_reward();
    // Writing its own directory works; everything else fails.
    assert_eq!(r.score(&s, &Completion::new(&py(&code))), Some(1.0));
    assert!(!inside.exists(), "{} was written", inside.display());
    assert!(!tmp.exists(), "{} was written", tmp.display());
    assert!(!cwd.exists(), "{} was written", cwd.display());
}

#[test]
fn killing_the_parent_or_everything_fails() {
    if !have_python() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let r = hostile_reward();
    for code in [
        // Scores 0 whether or not the kill "works" (inside its PID namespace it kills its own
        // group); the point is that this process survives.
        "import os\nos.kill(os.getppid(), 9)\nprint(4)",
        "import os\nos.kill(-1, 9)\nprint(4)",
        "import os, signal\nfor p in range(1, 40000):\n    try:\n        os.kill(p, signal.SIGTERM)\n    except OSError:\n        pass\nprint(4)",
    ] {
        let t = hostile(r.as_ref(), &aplusb(), code, Duration::from_secs(5));
        println!("{:?}: {t:?}", code.lines().nth(1));
    }
    // Still alive, and the sandbox still works.
    assert_eq!(
        r.score(
            &aplusb(),
            &Completion::new(&py("print(sum(map(int, input().split())))"))
        ),
        Some(1.0)
    );
}

#[test]
fn no_network() {
    if !have_python() {
        return;
    }
    let code = "import socket\ntry:\n    socket.create_connection(('127.0.0.1', 22), timeout=1)\n    print('connected')\nexcept OSError as e:\n    print('refused')";
    let s = sample(json!({"input_output": {"inputs": [""], "outputs": ["refused"]}}));
    let sb = sobre_reward::sandbox::Sandbox::new(Default::default(), Default::default()).unwrap();
    if !sb.support().network_namespace {
        eprintln!("skipped: no network namespace here");
        return;
    }
    assert_eq!(
        reward(json!({})).score(&s, &Completion::new(&py(code))),
        Some(1.0)
    );
}
