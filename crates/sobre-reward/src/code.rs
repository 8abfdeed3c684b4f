//! The `code` reward: run the completion's last fenced code block against the sample's tests in
//! the [`sandbox`](crate::sandbox), scoring the fraction of tests passed (or 1/0 with
//! `all_or_nothing`).
//!
//! Test formats, read from the sample (field names are parameters):
//!
//! - `input_output`: `{"inputs": [...], "outputs": [...]}` as a JSON object or a JSON string
//!   (APPS, TACO, verl's `prime_code`): stdin/stdout pairs; an input or output given as a list of
//!   lines is joined with `\n`. With `"fn_name"` (APPS call-based, Python only) each input is the
//!   argument list of a call of that function (or of `Solution().fn_name`), compared by `==` with
//!   the output (tuples as lists; an expected `[x]` also accepts `x`).
//! - `verification_info`: `{"language": "python", "test_cases": [{"input": .., "output": ..}]}`
//!   (open-r1), object or JSON string; another `language` than the reward's: not applicable.
//! - `test_list`: a list of assert statements (MBPP), one test each, after `test_setup_code`.
//! - `test` (+ `entry_point`): a test program run after the code (HumanEval: program = code +
//!   `"\n"` + test + `"\ncheck(entry_point)"`), one test.
//!
//! Output is compared as judges do: `\r\n` as `\n`, trailing whitespace of each line and trailing
//! blank lines ignored; with `float_tolerance`, tokens that both parse as numbers match within
//! that absolute or relative error. A test passes when the program exits 0 (and, for stdin/stdout
//! tests, prints the expected output) within its limits.

use crate::registry::{bad_param, parse_params};
use crate::sandbox::{Isolation, Limits, SANDBOX_PATH, Sandbox, Status, resolve_program};
use crate::{Completion, Reward, RewardError, Sample, Scores};
use regex::Regex;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

/// Parameters of `code`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CodeParams {
    /// Language of the code block (default `"python"`, which also accepts ```` ```py ````).
    pub language: String,
    /// Command line that runs a source file (the file's name is appended), default
    /// `["python3"]`; the program is looked up in `/usr/local/bin:/usr/bin:/bin`, then `PATH`.
    pub interpreter: Vec<String>,
    /// Wall-clock limit of one test, seconds.
    pub timeout_s: f64,
    /// CPU-time limit of one test, seconds (default: `timeout_s`).
    pub cpu_s: Option<f64>,
    /// Address-space limit, MiB.
    pub memory_mb: u64,
    /// Process limit (the program itself counts as one).
    pub max_processes: u64,
    /// Score 1 only when every test passes (default: the fraction passed).
    pub all_or_nothing: bool,
    /// Numbers in the output match within this absolute or relative error.
    pub float_tolerance: Option<f64>,
    /// Programs run at once (default 0: the number of CPUs).
    pub max_concurrency: usize,
    /// Run at most this many tests of a sample (default 0: all).
    pub max_tests: usize,
    /// After a test of a completion runs out of time, count its remaining tests as failed without
    /// running them (default true): a completion that loops costs one timeout, not one per test.
    pub skip_after_timeout: bool,
    /// Stdout kept per run, MiB; printing more fails the test.
    pub max_output_mb: u64,
    pub input_output_field: String,
    pub verification_field: String,
    pub test_list_field: String,
    pub test_setup_field: String,
    pub test_field: String,
    pub entry_point_field: String,
}

impl Default for CodeParams {
    fn default() -> Self {
        CodeParams {
            language: "python".into(),
            interpreter: vec!["python3".into()],
            timeout_s: 5.0,
            cpu_s: None,
            memory_mb: 1024,
            max_processes: 32,
            all_or_nothing: false,
            float_tolerance: None,
            max_concurrency: 0,
            max_tests: 0,
            skip_after_timeout: true,
            max_output_mb: 16,
            input_output_field: "input_output".into(),
            verification_field: "verification_info".into(),
            test_list_field: "test_list".into(),
            test_setup_field: "test_setup_code".into(),
            test_field: "test".into(),
            entry_point_field: "entry_point".into(),
        }
    }
}

/// One test of a sample.
#[derive(Debug, Clone, PartialEq)]
pub enum TestCase {
    /// Feed `input` on stdin, expect `output` on stdout.
    Stdio { input: String, output: String },
    /// Run the code followed by this test program; pass when it exits 0.
    Program(String),
    /// Call `fn_name(*args)` and compare with `expected` (Python only).
    Call {
        fn_name: String,
        args: Value,
        expected: Value,
    },
}

/// Fence tags and source file name of a language.
fn language_spec(language: &str) -> (Vec<String>, String) {
    let l = language.to_ascii_lowercase();
    let (tags, ext): (&[&str], &str) = match l.as_str() {
        "python" | "py" | "python3" => (&["python", "py", "python3"], "py"),
        "javascript" | "js" | "node" => (&["javascript", "js", "node"], "js"),
        "ruby" | "rb" => (&["ruby", "rb"], "rb"),
        "bash" | "sh" | "shell" => (&["bash", "sh", "shell"], "sh"),
        "perl" => (&["perl", "pl"], "pl"),
        "lua" => (&["lua"], "lua"),
        "php" => (&["php"], "php"),
        _ => (&[], l.as_str()),
    };
    let mut tags: Vec<String> = tags.iter().map(|t| t.to_string()).collect();
    if tags.is_empty() {
        tags.push(l.clone());
    }
    (tags, format!("main.{ext}"))
}

fn fence_regex() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(r"(?s)```([^\n`]*)\n(.*?)```").unwrap_or_else(|_| unreachable!("fixed regex"))
    })
}

/// The last fenced code block whose tag (its first word, case-insensitive) is one of `tags`.
pub fn extract_code<'a>(text: &'a str, tags: &[String]) -> Option<&'a str> {
    fence_regex()
        .captures_iter(text)
        .filter(|c| {
            let tag = c
                .get(1)
                .map_or("", |m| m.as_str())
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_ascii_lowercase();
            tags.contains(&tag)
        })
        .last()
        .and_then(|c| c.get(2))
        .map(|m| m.as_str())
}

/// Does `actual` match `expected` as a judge compares outputs?
pub fn outputs_match(actual: &str, expected: &str, float_tolerance: Option<f64>) -> bool {
    fn lines(s: &str) -> Vec<&str> {
        let mut v: Vec<&str> = s.split('\n').map(str::trim_end).collect();
        while v.last().is_some_and(|l| l.is_empty()) {
            v.pop();
        }
        v
    }
    let (a, e) = (lines(actual), lines(expected));
    if a.len() != e.len() {
        return false;
    }
    a.iter().zip(&e).all(|(x, y)| {
        x == y
            || float_tolerance.is_some_and(|tol| {
                let (xs, ys): (Vec<&str>, Vec<&str>) = (
                    x.split_whitespace().collect(),
                    y.split_whitespace().collect(),
                );
                xs.len() == ys.len()
                    && xs.iter().zip(&ys).all(|(p, q)| {
                        p == q
                            || match (p.parse::<f64>(), q.parse::<f64>()) {
                                (Ok(p), Ok(q)) if p.is_finite() && q.is_finite() => {
                                    let d = (p - q).abs();
                                    d <= tol || d <= tol * q.abs()
                                }
                                _ => false,
                            }
                    })
            })
    })
}

/// A field holding JSON, either as a JSON value or as a string of JSON text.
fn json_field(sample: &Sample, field: &str) -> Option<Value> {
    match sample.get(field)? {
        Value::String(s) => serde_json::from_str(s).ok(),
        Value::Null => None,
        v => Some(v.clone()),
    }
}

/// A test's input or output as text: strings as they are, lists of lines joined, numbers
/// printed.
fn as_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(items) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => Some(s.trim_end_matches('\n').to_string()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
            .map(|l| l.join("\n")),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The harness of a call-based test: reads `{"fn_name", "args", "expected"}` on stdin.
const CALL_HARNESS: &str = r#"

def _sobre_check():
    import json as _j, sys as _s
    _t = _j.loads(_s.stdin.read())
    _g = globals()
    _f = _g.get(_t["fn_name"])
    if _f is None and "Solution" in _g:
        _f = getattr(_g["Solution"](), _t["fn_name"])
    _a = _t["args"]
    if not isinstance(_a, list):
        _a = [_a]
    def _n(v):
        if isinstance(v, (list, tuple)):
            return [_n(x) for x in v]
        return v
    _r, _e = _n(_f(*_a)), _n(_t["expected"])
    _ok = _r == _e or (isinstance(_e, list) and len(_e) == 1 and _r == _e[0])
    _s.exit(0 if _ok else 1)

_sobre_check()
"#;

/// The `code` reward.
pub struct CodeReward {
    pub params: CodeParams,
    tags: Vec<String>,
    file: String,
    argv: Vec<String>,
    sandbox: Sandbox,
}

impl std::fmt::Debug for CodeReward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CodeReward")
            .field("argv", &self.argv)
            .field("sandbox", &self.sandbox.steps())
            .finish()
    }
}

/// Infrastructure failures (a spawn that failed, not a program that failed) go to stderr (the
/// first few) and fail the test.
fn warn(e: &crate::sandbox::SandboxError) {
    static SHOWN: AtomicUsize = AtomicUsize::new(0);
    if SHOWN.fetch_add(1, Ordering::Relaxed) < 10 {
        eprintln!("warning: reward `code`: {e} (the test counts as failed)");
    }
}

/// How one test ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Pass,
    Fail,
    /// Out of time (wall or CPU).
    Timeout,
}

impl CodeReward {
    /// Build from parameters: resolve the interpreter and check that it runs in the sandbox (so
    /// a missing interpreter is an error at start-up, not at the first step).
    pub fn new(params: CodeParams) -> Result<CodeReward, RewardError> {
        let program = Self::check(&params)?;
        let p = &params;
        let (tags, file) = language_spec(&p.language);
        let mut argv = vec![program.display().to_string()];
        argv.extend(p.interpreter[1..].iter().cloned());
        argv.push(file.clone());
        let limits = Limits {
            wall_time: Duration::from_secs_f64(p.timeout_s),
            cpu_time: Some(Duration::from_secs_f64(p.cpu_s.unwrap_or(p.timeout_s))),
            memory_bytes: Some(p.memory_mb.saturating_mul(1 << 20)),
            processes: Some(p.max_processes),
            stdout_bytes: usize::try_from(p.max_output_mb.saturating_mul(1 << 20))
                .unwrap_or(usize::MAX),
            ..Limits::default()
        };
        let sandbox =
            Sandbox::new(limits, Isolation::default()).map_err(|e| RewardError::Setup {
                reward: "code".into(),
                message: e.to_string(),
            })?;
        // An empty program must run: this catches interpreters the sandbox cannot execute (one
        // under a directory its unprivileged uid cannot read, such as /root).
        let smoke = sandbox
            .run(&argv, &[(&file, b"")], b"")
            .map_err(|e| bad_param("code", "interpreter", e.to_string()))?;
        if !smoke.success() {
            return Err(bad_param(
                "code",
                "interpreter",
                format!(
                    "`{}` does not run an empty program in the sandbox ({:?}): {}",
                    argv[0],
                    smoke.status,
                    smoke.stderr_tail(400).trim()
                ),
            ));
        }
        Ok(CodeReward {
            params,
            tags,
            file,
            argv,
            sandbox,
        })
    }

    /// The checks of [`CodeReward::new`] that have no side effect: parameter values, and that
    /// the interpreter exists. Returns the interpreter's path. A config check runs this; the run
    /// itself builds the reward once, which also runs an empty program in the sandbox.
    pub fn check(p: &CodeParams) -> Result<std::path::PathBuf, RewardError> {
        if !(p.timeout_s > 0.0 && p.timeout_s.is_finite()) {
            return Err(bad_param(
                "code",
                "timeout_s",
                "must be a positive number of seconds",
            ));
        }
        if p.cpu_s.is_some_and(|c| !(c > 0.0 && c.is_finite())) {
            return Err(bad_param(
                "code",
                "cpu_s",
                "must be a positive number of seconds",
            ));
        }
        if p.memory_mb == 0 {
            return Err(bad_param("code", "memory_mb", "must be positive"));
        }
        if p.max_processes == 0 {
            return Err(bad_param("code", "max_processes", "must be positive"));
        }
        if p.max_output_mb == 0 {
            return Err(bad_param("code", "max_output_mb", "must be positive"));
        }
        if p.float_tolerance
            .is_some_and(|t| !(t >= 0.0 && t.is_finite()))
        {
            return Err(bad_param(
                "code",
                "float_tolerance",
                "must be a finite number ≥ 0",
            ));
        }
        if p.language.trim().is_empty() {
            return Err(bad_param("code", "language", "must not be empty"));
        }
        let Some(first) = p.interpreter.first() else {
            return Err(bad_param("code", "interpreter", "must not be empty"));
        };
        resolve_program(first).ok_or_else(|| {
            bad_param(
                "code",
                "interpreter",
                format!("`{first}` not found (searched {SANDBOX_PATH}, then PATH)"),
            )
        })
    }

    /// The sandbox the tests run in (its limits and what the kernel allowed).
    pub fn sandbox(&self) -> &Sandbox {
        &self.sandbox
    }

    /// The sample's tests; `None` when it has none in a known format (or they are for another
    /// language).
    pub fn tests(&self, sample: &Sample) -> Option<Vec<TestCase>> {
        let p = &self.params;
        let mut tests = if let Some(io) = json_field(sample, &p.input_output_field) {
            let inputs = io.get("inputs")?.as_array()?;
            let outputs = io.get("outputs")?.as_array()?;
            if inputs.len() != outputs.len() {
                return None;
            }
            match io.get("fn_name").and_then(Value::as_str) {
                Some(name) => inputs
                    .iter()
                    .zip(outputs)
                    .map(|(i, o)| TestCase::Call {
                        fn_name: name.to_string(),
                        args: i.clone(),
                        expected: o.clone(),
                    })
                    .collect(),
                None => inputs
                    .iter()
                    .zip(outputs)
                    .map(|(i, o)| {
                        Some(TestCase::Stdio {
                            input: as_text(i)?,
                            output: as_text(o)?,
                        })
                    })
                    .collect::<Option<Vec<_>>>()?,
            }
        } else if let Some(info) = json_field(sample, &p.verification_field) {
            if let Some(lang) = info.get("language").and_then(Value::as_str)
                && !self.tags.iter().any(|t| t.eq_ignore_ascii_case(lang))
            {
                return None;
            }
            info.get("test_cases")?
                .as_array()?
                .iter()
                .map(|t| {
                    Some(TestCase::Stdio {
                        input: as_text(t.get("input")?)?,
                        output: as_text(t.get("output")?)?,
                    })
                })
                .collect::<Option<Vec<_>>>()?
        } else if let Some(list) = sample.get(&p.test_list_field).and_then(Value::as_array) {
            let setup = sample
                .get(&p.test_setup_field)
                .and_then(Value::as_str)
                .unwrap_or("");
            list.iter()
                .map(|t| {
                    t.as_str()
                        .map(|a| TestCase::Program(format!("{setup}\n{a}\n")))
                })
                .collect::<Option<Vec<_>>>()?
        } else if let Some(test) = sample.get(&p.test_field).and_then(Value::as_str) {
            let call = sample
                .get(&p.entry_point_field)
                .and_then(Value::as_str)
                .map_or(String::new(), |ep| format!("\ncheck({ep})\n"));
            vec![TestCase::Program(format!("{test}{call}"))]
        } else {
            return None;
        };
        if tests.iter().any(|t| matches!(t, TestCase::Call { .. })) && self.file != "main.py" {
            return None;
        }
        if p.max_tests > 0 {
            tests.truncate(p.max_tests);
        }
        (!tests.is_empty()).then_some(tests)
    }

    /// Run one test of `code`.
    fn run_test(&self, code: &str, test: &TestCase) -> Verdict {
        let (program, stdin) = match test {
            TestCase::Stdio { input, .. } => (code.to_string(), input.clone().into_bytes()),
            TestCase::Program(suffix) => (format!("{code}\n\n{suffix}"), Vec::new()),
            TestCase::Call {
                fn_name,
                args,
                expected,
            } => (
                format!("{code}\n{CALL_HARNESS}"),
                serde_json::json!({"fn_name": fn_name, "args": args, "expected": expected})
                    .to_string()
                    .into_bytes(),
            ),
        };
        let out = match self
            .sandbox
            .run(&self.argv, &[(&self.file, program.as_bytes())], &stdin)
        {
            Ok(o) => o,
            Err(e) => {
                warn(&e);
                return Verdict::Fail;
            }
        };
        match out.status {
            Status::WallTimeout | Status::CpuTimeLimit => Verdict::Timeout,
            Status::Exited(0) => match test {
                TestCase::Stdio { output, .. } => {
                    let got = String::from_utf8_lossy(&out.stdout);
                    if outputs_match(&got, output, self.params.float_tolerance) {
                        Verdict::Pass
                    } else {
                        Verdict::Fail
                    }
                }
                _ => Verdict::Pass,
            },
            _ => Verdict::Fail,
        }
    }

    fn concurrency(&self) -> usize {
        match self.params.max_concurrency {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        }
    }

    /// Score a batch: every (completion, test) pair is one run; up to `max_concurrency` run at
    /// once across the whole batch.
    pub fn score_many(&self, items: &[(&Sample, Completion<'_>)]) -> Vec<Option<f32>> {
        struct Job<'a> {
            code: &'a str,
            tests: Vec<TestCase>,
            passed: AtomicUsize,
            stop: AtomicBool,
        }
        let mut scores: Vec<Option<f32>> = vec![None; items.len()];
        let mut jobs: Vec<(usize, Job<'_>)> = Vec::new();
        for (i, (sample, completion)) in items.iter().enumerate() {
            let Some(tests) = self.tests(sample) else {
                continue;
            };
            match extract_code(completion.text, &self.tags) {
                None => scores[i] = Some(0.0),
                Some(code) => jobs.push((
                    i,
                    Job {
                        code,
                        tests,
                        passed: AtomicUsize::new(0),
                        stop: AtomicBool::new(false),
                    },
                )),
            }
        }
        let units: Vec<(usize, usize)> = jobs
            .iter()
            .enumerate()
            .flat_map(|(j, (_, job))| (0..job.tests.len()).map(move |t| (j, t)))
            .collect();
        let next = AtomicUsize::new(0);
        let work = || {
            loop {
                let u = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(j, t)) = units.get(u) else {
                    return;
                };
                let job = &jobs[j].1;
                if job.stop.load(Ordering::Relaxed) {
                    continue;
                }
                match self.run_test(job.code, &job.tests[t]) {
                    Verdict::Pass => {
                        job.passed.fetch_add(1, Ordering::Relaxed);
                    }
                    Verdict::Fail if self.params.all_or_nothing => {
                        job.stop.store(true, Ordering::Relaxed)
                    }
                    Verdict::Timeout
                        if self.params.all_or_nothing || self.params.skip_after_timeout =>
                    {
                        job.stop.store(true, Ordering::Relaxed)
                    }
                    _ => {}
                }
            }
        };
        let workers = self.concurrency().min(units.len());
        if workers <= 1 {
            work();
        } else {
            std::thread::scope(|s| {
                for _ in 0..workers {
                    s.spawn(work);
                }
            });
        }
        for (i, job) in &jobs {
            let passed = job.passed.load(Ordering::Relaxed);
            let total = job.tests.len();
            scores[*i] = Some(if self.params.all_or_nothing {
                if passed == total { 1.0 } else { 0.0 }
            } else {
                passed as f32 / total as f32
            });
        }
        scores
    }
}

impl Reward for CodeReward {
    fn name(&self) -> &str {
        "code"
    }

    fn score(&self, sample: &Sample, completion: &Completion<'_>) -> Option<f32> {
        self.score_many(&[(sample, *completion)]).pop().flatten()
    }

    fn score_batch(&self, items: &[(&Sample, Completion<'_>)]) -> Result<Vec<Scores>, RewardError> {
        Ok(self
            .score_many(items)
            .into_iter()
            .map(Scores::single)
            .collect())
    }
}

pub(crate) fn build(params: &Map<String, Value>) -> Result<Box<dyn Reward>, RewardError> {
    Ok(Box::new(CodeReward::new(parse_params("code", params)?)?))
}

pub(crate) fn check(params: &Map<String, Value>) -> Result<(), RewardError> {
    CodeReward::check(&parse_params("code", params)?).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extracts_the_last_block_of_the_language() {
        let tags = language_spec("python").0;
        let text =
            "x\n```python\na = 1\n```\nthen\n```\nplain\n```\n```py\nb = 2\n```\n```js\nc\n```";
        assert_eq!(extract_code(text, &tags), Some("b = 2\n"));
        assert_eq!(extract_code("```Python3 title\nz\n```", &tags), Some("z\n"));
        assert_eq!(extract_code("no code", &tags), None);
        assert_eq!(extract_code("```python\nunclosed", &tags), None);
        assert_eq!(extract_code(text, &language_spec("js").0), Some("c\n"));
    }

    #[test]
    fn compares_outputs_like_a_judge() {
        assert!(outputs_match("1 2  \n3\n\n\n", "1 2\n3", None));
        assert!(outputs_match("a\r\nb\r\n", "a\nb\n", None));
        assert!(!outputs_match("1 2\n", "1  2\n", None));
        assert!(!outputs_match("1\n2\n", "1\n", None));
        assert!(!outputs_match("", "0", None));
        assert!(outputs_match("", "\n", None));
        assert!(!outputs_match("0.3333", "0.333333", None));
        assert!(outputs_match("0.3333 x", "0.333333 x", Some(1e-3)));
        assert!(!outputs_match("0.3333 y", "0.333333 x", Some(1e-3)));
        assert!(outputs_match("1000001", "1000000", Some(1e-6)));
        assert!(!outputs_match("1000002", "1000000", Some(1e-6)));
        assert!(!outputs_match("nan", "nan1", Some(1.0)));
    }

    #[test]
    fn language_table() {
        assert_eq!(language_spec("python").1, "main.py");
        assert_eq!(language_spec("JavaScript").1, "main.js");
        assert_eq!(
            language_spec("julia"),
            (vec!["julia".to_string()], "main.julia".into())
        );
    }
}
