//! The `command` reward: a verifier program of the user's, kept running, asked over JSON lines.
//!
//! Protocol: for each completion the reward writes one line to the program's stdin, a JSON
//! object with the sample's fields (`prompt`, `answer`, … as the trainer gives them) and
//! `completion` (the generated text); the program answers with one line on stdout, either
//! `{"reward": 0.7}` (`null`: does not apply) or `{"rewards": {"a": 1, "b": 0}}` (several
//! components: the reward is their sum, and each component named in the `components`
//! parameter is logged as `command/a`). Anything the program wants to say goes to stderr.
//!
//! Each call has a timeout (`timeout_s`); a program that exits, or runs out of time, is started
//! again and asked again, up to `max_restarts` times in a row, after which the reward fails with
//! the end of the program's stderr. A reply that is not one of the two shapes is an error that
//! quotes the line. The program runs in its own session and process group (it cannot signal the
//! trainer's group), in the trainer's cwd (or `cwd`) with the trainer's environment; it is the
//! user's own program, so no memory or process limit applies unless `memory_mb` is given.

use crate::registry::{bad_param, parse_params};
use crate::{Completion, Reward, RewardError, Sample, Scores};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::io::{self, Read, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Parameters of `command`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommandParams {
    /// The program and its arguments, e.g. `["python3", "my_reward.py"]` (required).
    pub command: Vec<String>,
    /// Seconds one reply may take.
    pub timeout_s: f64,
    /// Restarts in a row (after an exit or a timeout) before the reward fails.
    pub max_restarts: u32,
    /// Address-space limit of the program, MiB (default: none).
    pub memory_mb: Option<u64>,
    /// Names of the components of `{"rewards": {...}}` replies to log, in order.
    pub components: Vec<String>,
    /// Copies of the program run at once (a batch is spread over them).
    pub processes: usize,
    /// Working directory of the program (default: the trainer's).
    pub cwd: Option<String>,
}

impl Default for CommandParams {
    fn default() -> Self {
        CommandParams {
            command: Vec::new(),
            timeout_s: 30.0,
            max_restarts: 3,
            memory_mb: None,
            components: Vec::new(),
            processes: 1,
            cwd: None,
        }
    }
}

/// The end of a program's stderr, collected by a thread as it is written.
#[derive(Default)]
struct Tail(Vec<u8>);

const TAIL_BYTES: usize = 4096;

impl Tail {
    fn push(&mut self, data: &[u8]) {
        self.0.extend_from_slice(data);
        if self.0.len() > 2 * TAIL_BYTES {
            let cut = self.0.len() - TAIL_BYTES;
            self.0.drain(..cut);
        }
    }

    fn text(&self) -> String {
        let start = self.0.len().saturating_sub(TAIL_BYTES);
        String::from_utf8_lossy(&self.0[start..])
            .trim_end()
            .to_string()
    }
}

/// One running copy of the program.
struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: ChildStdout,
    /// Bytes read past the last reply.
    pending: Vec<u8>,
    stderr: Arc<Mutex<Tail>>,
}

/// Why a call got no reply.
enum Failure {
    Exited,
    Timeout,
    Io(io::Error),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Exited => write!(f, "the program exited"),
            Failure::Timeout => write!(f, "no reply within the timeout"),
            Failure::Io(e) => write!(f, "{e}"),
        }
    }
}

const MAX_REPLY: usize = 16 << 20;

#[cfg(target_os = "linux")]
fn set_nonblocking(fd: std::os::fd::RawFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd we own.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

impl Worker {
    fn start(p: &CommandParams) -> io::Result<Worker> {
        let (program, args) = p
            .command
            .split_first()
            .ok_or_else(|| io::Error::other("empty command"))?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(dir) = &p.cwd {
            cmd.current_dir(dir);
        }
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::process::CommandExt;
            let memory = p.memory_mb.map(|m| m.saturating_mul(1 << 20));
            // SAFETY: only setsid/setrlimit, async-signal-safe system calls.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setsid() < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    if let Some(bytes) = memory {
                        let lim = libc::rlimit {
                            rlim_cur: bytes,
                            rlim_max: bytes,
                        };
                        if libc::setrlimit(libc::RLIMIT_AS, &lim) < 0 {
                            return Err(io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn()?;
        let (Some(stdin), Some(stdout), Some(mut stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::other("no pipes to the program"));
        };
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            set_nonblocking(stdin.as_raw_fd())?;
            set_nonblocking(stdout.as_raw_fd())?;
        }
        let tail = Arc::new(Mutex::new(Tail::default()));
        let sink = Arc::clone(&tail);
        std::thread::Builder::new()
            .name("command-stderr".into())
            .spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stderr.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if let Ok(mut t) = sink.lock() {
                        t.push(&buf[..n]);
                    }
                }
            })?;
        Ok(Worker {
            child,
            stdin,
            stdout,
            pending: Vec::new(),
            stderr: tail,
        })
    }

    fn stderr_tail(&self) -> String {
        self.stderr.lock().map(|t| t.text()).unwrap_or_default()
    }

    /// Send one line, read one line back, within `timeout`.
    #[cfg(target_os = "linux")]
    fn call(&mut self, line: &[u8], timeout: Duration) -> Result<String, Failure> {
        use std::os::fd::AsRawFd;
        let deadline = Instant::now() + timeout;
        let mut written = 0usize;
        loop {
            if let Some(nl) = self.pending.iter().position(|&b| b == b'\n') {
                let reply: Vec<u8> = self.pending.drain(..=nl).collect();
                return Ok(String::from_utf8_lossy(&reply[..nl]).trim_end().to_string());
            }
            if self.pending.len() > MAX_REPLY {
                return Err(Failure::Io(io::Error::other(
                    "a reply line longer than 16 MiB",
                )));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Failure::Timeout);
            }
            let mut fds = vec![libc::pollfd {
                fd: self.stdout.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            if written < line.len() {
                fds.push(libc::pollfd {
                    fd: self.stdin.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                });
            }
            let ms = deadline
                .saturating_duration_since(now)
                .as_millis()
                .clamp(1, 60_000) as i32;
            // SAFETY: a valid pollfd array of the given length.
            unsafe {
                libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms);
            }
            if written < line.len() {
                match self.stdin.write(&line[written..]) {
                    Ok(n) => written += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Err(Failure::Exited),
                    Err(e) => return Err(Failure::Io(e)),
                }
            }
            let mut buf = [0u8; 65536];
            match self.stdout.read(&mut buf) {
                Ok(0) => return Err(Failure::Exited),
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Failure::Io(e)),
            }
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn call(&mut self, _line: &[u8], _timeout: Duration) -> Result<String, Failure> {
        Err(Failure::Io(io::Error::other(
            "the command reward needs Linux",
        )))
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        // SAFETY: the child is not reaped yet, so its process group id is still ours.
        unsafe {
            libc::kill(-(self.child.id() as libc::pid_t), libc::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `command` reward.
pub struct CommandReward {
    pub params: CommandParams,
    /// Running copies of the program; `None` until started (or after a failure).
    workers: Vec<Mutex<Option<Worker>>>,
    calls: AtomicUsize,
}

impl std::fmt::Debug for CommandReward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandReward")
            .field("command", &self.params.command)
            .finish()
    }
}

fn runtime(message: String) -> RewardError {
    RewardError::Runtime {
        reward: "command".into(),
        message,
    }
}

/// Read a reply line: `{"reward": x}` or `{"rewards": {...}}`.
pub fn parse_reply(line: &str, components: &[String]) -> Result<Scores, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON ({e})"))?;
    let Value::Object(obj) = v else {
        return Err("not a JSON object".into());
    };
    let number = |v: &Value, what: &str| -> Result<Option<f32>, String> {
        match v {
            Value::Null => Ok(None),
            Value::Number(n) => n
                .as_f64()
                .filter(|x| x.is_finite())
                .map(|x| Some(x as f32))
                .ok_or_else(|| format!("{what} is not a finite number")),
            Value::Bool(b) => Ok(Some(if *b { 1.0 } else { 0.0 })),
            other => Err(format!("{what} must be a number or null, found {other}")),
        }
    };
    let mut out = Scores {
        value: None,
        components: vec![None; components.len()],
    };
    let mut shaped = false;
    if let Some(r) = obj.get("rewards") {
        let Value::Object(parts) = r else {
            return Err("`rewards` must be an object of numbers".into());
        };
        let mut sum: Option<f32> = None;
        for (k, v) in parts {
            let x = number(v, &format!("`rewards.{k}`"))?;
            if let Some(x) = x {
                sum = Some(sum.unwrap_or(0.0) + x);
            }
            match components.iter().position(|c| c == k) {
                Some(i) => out.components[i] = x,
                None if !components.is_empty() => {
                    return Err(format!(
                        "component `{k}` is not one of `components` ({})",
                        components.join(", ")
                    ));
                }
                None => {}
            }
        }
        out.value = sum;
        shaped = true;
    }
    if let Some(r) = obj.get("reward") {
        out.value = number(r, "`reward`")?;
        shaped = true;
    }
    if !shaped {
        return Err(r#"expected {"reward": number} or {"rewards": {"name": number, ...}}"#.into());
    }
    Ok(out)
}

impl CommandReward {
    /// Build and start the program once (a program that cannot start is an error now).
    pub fn new(params: CommandParams) -> Result<CommandReward, RewardError> {
        Self::check(&params)?;
        let first = Worker::start(&params).map_err(|e| {
            bad_param(
                "command",
                "command",
                format!("`{}` could not start: {e}", params.command.join(" ")),
            )
        })?;
        let mut workers = vec![Mutex::new(Some(first))];
        workers.extend((1..params.processes).map(|_| Mutex::new(None)));
        Ok(CommandReward {
            params,
            workers,
            calls: AtomicUsize::new(0),
        })
    }

    /// The checks of [`CommandReward::new`] that have no side effect: parameter values, and
    /// that the program exists. A config check runs this; the run itself starts the program once.
    pub fn check(p: &CommandParams) -> Result<(), RewardError> {
        if p.command.is_empty() {
            return Err(bad_param(
                "command",
                "command",
                "required: the program and its arguments, e.g. [\"python3\", \"my_reward.py\"]",
            ));
        }
        if !(p.timeout_s > 0.0 && p.timeout_s.is_finite()) {
            return Err(bad_param(
                "command",
                "timeout_s",
                "must be a positive number of seconds",
            ));
        }
        if p.processes == 0 {
            return Err(bad_param("command", "processes", "must be at least 1"));
        }
        if p.memory_mb == Some(0) {
            return Err(bad_param("command", "memory_mb", "must be positive"));
        }
        if !cfg!(target_os = "linux") {
            return Err(RewardError::Setup {
                reward: "command".into(),
                message: format!("unsupported on {}: it needs Linux", std::env::consts::OS),
            });
        }
        // A path is looked up where the program will start (`cwd`, else here); a bare name on
        // PATH, as the OS will.
        let program = &p.command[0];
        let found = if program.contains('/') {
            let at = std::path::Path::new(program);
            at.is_file() || p.cwd.as_ref().is_some_and(|d| std::path::Path::new(d).join(at).is_file())
        } else {
            std::env::var_os("PATH").is_some_and(|path| {
                std::env::split_paths(&path).any(|d| d.join(program).is_file())
            })
        };
        if !found {
            return Err(bad_param(
                "command",
                "command",
                format!("`{program}` not found (a path, or a program on PATH)"),
            ));
        }
        Ok(())
    }

    /// The request line of one completion.
    fn request(sample: &Sample, completion: &Completion<'_>) -> Vec<u8> {
        let mut m = sample.clone();
        m.insert(
            "completion".into(),
            Value::String(completion.text.to_string()),
        );
        let mut line = Value::Object(m).to_string().into_bytes();
        line.push(b'\n');
        line
    }

    /// Ask worker `w` about one completion, restarting it as needed.
    fn ask(&self, w: usize, line: &[u8]) -> Result<Scores, RewardError> {
        let call_no = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
        let timeout = Duration::from_secs_f64(self.params.timeout_s);
        let mut slot = self.workers[w]
            .lock()
            .map_err(|_| runtime("a scoring thread panicked".into()))?;
        let mut failures = 0u32;
        loop {
            if slot.is_none() {
                *slot = Some(Worker::start(&self.params).map_err(|e| {
                    runtime(format!(
                        "`{}` could not be restarted: {e}",
                        self.params.command.join(" ")
                    ))
                })?);
            }
            let Some(worker) = slot.as_mut() else {
                continue;
            };
            match worker.call(line, timeout) {
                Ok(reply) => {
                    return parse_reply(&reply, &self.params.components).map_err(|why| {
                        runtime(format!(
                            "malformed reply to request {call_no}: {why}: `{}`",
                            reply.chars().take(300).collect::<String>()
                        ))
                    });
                }
                Err(fail) => {
                    failures += 1;
                    // Give the stderr thread a moment to collect the last words.
                    if matches!(fail, Failure::Exited) {
                        let _ = worker.child.wait();
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    let tail = worker.stderr_tail();
                    *slot = None;
                    if failures > self.params.max_restarts {
                        let tail = if tail.is_empty() {
                            "(nothing on stderr)".to_string()
                        } else {
                            format!("its stderr ends with:\n{tail}")
                        };
                        return Err(runtime(format!(
                            "`{}` failed {failures} time(s) in a row on request {call_no} \
                             (last: {fail}; max_restarts = {}); {tail}",
                            self.params.command.join(" "),
                            self.params.max_restarts
                        )));
                    }
                }
            }
        }
    }
}

impl Reward for CommandReward {
    fn name(&self) -> &str {
        "command"
    }

    fn components(&self) -> &[String] {
        &self.params.components
    }

    fn score(&self, sample: &Sample, completion: &Completion<'_>) -> Option<f32> {
        match self.ask(0, &Self::request(sample, completion)) {
            Ok(s) => s.value,
            Err(e) => {
                eprintln!("warning: {e} (scored as null)");
                None
            }
        }
    }

    fn score_batch(&self, items: &[(&Sample, Completion<'_>)]) -> Result<Vec<Scores>, RewardError> {
        let lines: Vec<Vec<u8>> = items.iter().map(|(s, c)| Self::request(s, c)).collect();
        let workers = self.workers.len().min(items.len());
        if workers <= 1 {
            return lines.iter().map(|l| self.ask(0, l)).collect();
        }
        let next = AtomicUsize::new(0);
        let results: Vec<Mutex<Option<Result<Scores, RewardError>>>> =
            (0..items.len()).map(|_| Mutex::new(None)).collect();
        std::thread::scope(|s| {
            for w in 0..workers {
                let (next, results, lines) = (&next, &results, &lines);
                s.spawn(move || {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(line) = lines.get(i) else {
                            return;
                        };
                        let r = self.ask(w, line);
                        let failed = r.is_err();
                        if let Ok(mut slot) = results[i].lock() {
                            *slot = Some(r);
                        }
                        if failed {
                            next.store(lines.len(), Ordering::Relaxed);
                            return;
                        }
                    }
                });
            }
        });
        let mut out = Vec::with_capacity(items.len());
        for r in results {
            match r.into_inner().ok().flatten() {
                Some(r) => out.push(r?),
                None => return Err(runtime("a completion was not scored".into())),
            }
        }
        Ok(out)
    }
}

pub(crate) fn build(params: &Map<String, Value>) -> Result<Box<dyn Reward>, RewardError> {
    Ok(Box::new(CommandReward::new(parse_params(
        "command", params,
    )?)?))
}

pub(crate) fn check(params: &Map<String, Value>) -> Result<(), RewardError> {
    CommandReward::check(&parse_params("command", params)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies() {
        let none: Vec<String> = vec![];
        assert_eq!(
            parse_reply(r#"{"reward": 0.5}"#, &none),
            Ok(Scores::single(Some(0.5)))
        );
        assert_eq!(
            parse_reply(r#"{"reward": null}"#, &none),
            Ok(Scores::single(None))
        );
        let ab = vec!["a".to_string(), "b".to_string()];
        assert_eq!(
            parse_reply(r#"{"rewards": {"b": 0.25, "a": 1}}"#, &ab),
            Ok(Scores {
                value: Some(1.25),
                components: vec![Some(1.0), Some(0.25)]
            })
        );
        assert_eq!(
            parse_reply(r#"{"rewards": {"a": 1}}"#, &ab),
            Ok(Scores {
                value: Some(1.0),
                components: vec![Some(1.0), None]
            })
        );
        let e = parse_reply(r#"{"rewards": {"c": 1}}"#, &ab).unwrap_err();
        assert!(e.contains("`c`") && e.contains("a, b"), "{e}");
        assert!(parse_reply("0.5", &none).unwrap_err().contains("object"));
        assert!(
            parse_reply(r#"{"score": 1}"#, &none)
                .unwrap_err()
                .contains("expected")
        );
        assert!(
            parse_reply(r#"{"reward": "high"}"#, &none)
                .unwrap_err()
                .contains("number")
        );
        assert!(parse_reply("oops", &none).unwrap_err().contains("not JSON"));
    }
}
