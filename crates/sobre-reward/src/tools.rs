//! Tools a policy can call inside a rollout (`[tools]`): how a call is written, and what answers
//! it. Text in, text out: the rollout engine (`sobre-rollout::tools`) pauses the sequence, the
//! trainer tokenizes the response this module renders.
//!
//! Formats:
//! - `hermes`: `<tool_call>{"name": "calculator", "arguments": {"expression": "8*4"}}</tool_call>`,
//!   the Hermes / Qwen2.5 / Qwen3 chat templates' form; answered with
//!   `<tool_response>\n…\n</tool_response>`.
//! - `inline`: a short form for small models trained from scratch: `open` + input + `close`
//!   (default `<calc>8*4</calc>`) calls the one tool `tool` with the input as its argument;
//!   answered with `response_open` + output + `response_close` (default `<result>32</result>`).
//!
//! Tools:
//! - `calculator`: exact rational arithmetic (`+ - * /`, parentheses), the countdown verifier's
//!   evaluator ([`crate::countdown::evaluate`]); `{"expression": "…"}` or a plain string.
//! - `python`: runs `{"code": "…"}` (or the inline input) with `python3` in the code reward's
//!   sandbox (no network, private filesystem, wall and CPU limits); its stdout comes back.
//! - `command`: a user program (`command = ["prog", "arg"]`), run in the sandbox once per call
//!   with one JSON line `{"name", "arguments"}` on stdin, answering with one JSON line
//!   `{"output": "…"}` or `{"error": "…"}` (any other stdout is taken as the output).
//!
//! Every failure is a response, as a real tool's would be: bad JSON, an unknown tool, a bad
//! expression, a program that fails or runs past `timeout_s` come back as `error: …` text, and
//! are counted as tool errors.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::countdown::{evaluate, format_rational};
use crate::sandbox::{Isolation, Limits, Sandbox, Status, resolve_program};

/// `[tools]`: which tools, in which format, within which limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ToolParams {
    /// `hermes` or `inline`.
    pub format: String,
    /// The tools a `hermes` call may name (`calculator`, `python`, `command`).
    pub names: Vec<String>,
    /// `inline`: the strings around a call, and the tool it calls.
    pub open: String,
    pub close: String,
    pub tool: String,
    /// The strings around a response (default: the format's).
    pub response_open: Option<String>,
    pub response_close: Option<String>,
    /// Calls answered per completion.
    pub max_calls: usize,
    /// A response is cut to this many tokens.
    pub max_response_tokens: usize,
    /// Decode steps a paused sequence idles while its tool runs (fixed: results do not depend
    /// on timing).
    pub overlap_steps: usize,
    /// Whether response tokens count towards `rollout.max_new_tokens`.
    pub responses_count_as_new_tokens: bool,
    /// Wall-clock limit of one `python` or `command` call, seconds.
    pub timeout_s: f64,
    /// A tool's output is cut to this many characters before it is tokenized.
    pub max_output_chars: usize,
    /// The `command` tool's program and arguments.
    pub command: Vec<String>,
    /// The `python` tool's interpreter (resolved on PATH).
    pub python: String,
}

impl Default for ToolParams {
    fn default() -> Self {
        ToolParams {
            format: "hermes".into(),
            names: vec!["calculator".into()],
            open: "<calc>".into(),
            close: "</calc>".into(),
            tool: "calculator".into(),
            response_open: None,
            response_close: None,
            max_calls: 4,
            max_response_tokens: 32,
            overlap_steps: 4,
            responses_count_as_new_tokens: false,
            timeout_s: 5.0,
            max_output_chars: 400,
            command: vec![],
            python: "python3".into(),
        }
    }
}

impl ToolParams {
    /// The strings around a response: `response_open` / `response_close`, else the format's
    /// (`<tool_response>\n` … `\n</tool_response>` for hermes, `<result>` … `</result>` inline).
    pub fn response_markers(&self) -> (&str, &str) {
        let hermes = self.format == "hermes";
        let open = self.response_open.as_deref();
        let close = self.response_close.as_deref();
        (
            open.unwrap_or(if hermes { "<tool_response>\n" } else { "<result>" }),
            close.unwrap_or(if hermes { "\n</tool_response>" } else { "</result>" }),
        )
    }
}

pub const FORMATS: &[&str] = &["hermes", "inline"];
pub const TOOLS: &[&str] = &["calculator", "python", "command"];

/// Why a `[tools]` table cannot be used: the key and what was expected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("tools.{key}: {msg}")]
pub struct ToolConfigError {
    pub key: &'static str,
    pub msg: String,
}

fn bad(key: &'static str, msg: impl Into<String>) -> ToolConfigError {
    ToolConfigError {
        key,
        msg: msg.into(),
    }
}

/// Ready-to-call tools: [`ToolBox::closed_call`] finds a call in sampled text,
/// [`ToolBox::respond`] answers it with the whole response text (markers included).
pub struct ToolBox {
    params: ToolParams,
    sandbox: Option<Sandbox>,
    python: Option<String>,
    command: Option<Vec<String>>,
}

impl std::fmt::Debug for ToolBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ToolBox")
            .field("format", &self.params.format)
            .field("tools", &self.available())
            .finish()
    }
}

impl ToolBox {
    /// Check `params` and set the tools up: the format and names are known, the limits are
    /// positive, the interpreter and the command exist.
    pub fn new(params: ToolParams) -> Result<ToolBox, ToolConfigError> {
        let p = &params;
        if !FORMATS.contains(&p.format.as_str()) {
            return Err(bad(
                "format",
                format!("`{}`; expected one of: hermes, inline", p.format),
            ));
        }
        let used: Vec<&str> = if p.format == "inline" {
            if p.open.is_empty() || p.close.is_empty() {
                return Err(bad(
                    "open",
                    "inline calls need non-empty `open` and `close` strings",
                ));
            }
            vec![p.tool.as_str()]
        } else {
            if p.names.is_empty() {
                return Err(bad(
                    "names",
                    "name at least one tool: calculator, python, command",
                ));
            }
            p.names.iter().map(String::as_str).collect()
        };
        let key = if p.format == "inline" {
            "tool"
        } else {
            "names"
        };
        for n in &used {
            if !TOOLS.contains(n) {
                return Err(bad(
                    key,
                    format!("unknown tool `{n}`; expected one of: calculator, python, command"),
                ));
            }
        }
        if p.max_calls == 0 {
            return Err(bad("max_calls", "must be at least 1"));
        }
        if p.max_response_tokens == 0 {
            return Err(bad("max_response_tokens", "must be at least 1"));
        }
        if !(p.timeout_s > 0.0 && p.timeout_s.is_finite()) {
            return Err(bad(
                "timeout_s",
                format!("must be a finite number > 0, found {}", p.timeout_s),
            ));
        }
        let needs_sandbox = used.iter().any(|n| *n != "calculator");
        let sandbox = if needs_sandbox {
            let limits = Limits {
                wall_time: Duration::from_secs_f64(p.timeout_s),
                cpu_time: Some(Duration::from_secs_f64(p.timeout_s)),
                stdout_bytes: 1 << 20,
                ..Limits::default()
            };
            Some(
                Sandbox::new(limits, Isolation::default())
                    .map_err(|e| bad("names", e.to_string()))?,
            )
        } else {
            None
        };
        let python = if used.contains(&"python") {
            let path = resolve_program(&p.python)
                .ok_or_else(|| bad("python", format!("`{}` is not on PATH", p.python)))?;
            Some(path.display().to_string())
        } else {
            None
        };
        let command = if used.contains(&"command") {
            let (prog, args) = p.command.split_first().ok_or_else(|| {
                bad(
                    "command",
                    "the `command` tool needs `command = [\"program\", …]`",
                )
            })?;
            let path = resolve_program(prog).ok_or_else(|| {
                bad(
                    "command",
                    format!("`{prog}` is not a program here (not on PATH, not a file)"),
                )
            })?;
            let mut argv = vec![path.display().to_string()];
            argv.extend(args.iter().cloned());
            Some(argv)
        } else {
            None
        };
        Ok(ToolBox {
            params,
            sandbox,
            python,
            command,
        })
    }

    pub fn params(&self) -> &ToolParams {
        &self.params
    }

    fn available(&self) -> Vec<&str> {
        if self.params.format == "inline" {
            vec![self.params.tool.as_str()]
        } else {
            self.params.names.iter().map(String::as_str).collect()
        }
    }

    fn markers(&self) -> (&str, &str) {
        let hermes = self.params.format == "hermes";
        let (o, c) = if hermes {
            ("<tool_call>", "</tool_call>")
        } else {
            (self.params.open.as_str(), self.params.close.as_str())
        };
        (o, c)
    }

    /// The first complete call in `text` (the text sampled since the last response): its
    /// input between the open and close strings.
    pub fn closed_call(&self, text: &str) -> Option<String> {
        let (open, close) = self.markers();
        let start = text.find(open)? + open.len();
        let end = text[start..].find(close)? + start;
        Some(text[start..end].to_string())
    }

    /// Answer the call whose input is `call`: the response text with its markers, and whether
    /// the tool failed.
    pub fn respond(&self, call: &str) -> (String, bool) {
        let (output, error) = match self.dispatch(call) {
            Ok(out) => (out, false),
            Err(e) => (format!("error: {e}"), true),
        };
        let output = cut(&output, self.params.max_output_chars);
        let (open, close) = self.params.response_markers();
        (format!("{open}{output}{close}"), error)
    }

    fn dispatch(&self, call: &str) -> Result<String, String> {
        let (name, args) = if self.params.format == "inline" {
            (self.params.tool.clone(), Value::String(call.to_string()))
        } else {
            let v: Value = serde_json::from_str(call.trim())
                .map_err(|e| format!("the tool call is not JSON ({e})"))?;
            let name = v
                .get("name")
                .and_then(Value::as_str)
                .ok_or("the tool call has no \"name\"")?
                .to_string();
            let args = v.get("arguments").cloned().unwrap_or(Value::Null);
            (name, args)
        };
        if !self.available().contains(&name.as_str()) {
            return Err(format!(
                "unknown tool `{name}`; available: {}",
                self.available().join(", ")
            ));
        }
        match name.as_str() {
            "calculator" => {
                let expr = argument(&args, "expression")?;
                evaluate(&expr).map(|v| format_rational(&v))
            }
            "python" => {
                let code = argument(&args, "code")?;
                let python = self.python.clone().ok_or("python is not set up")?;
                self.run(
                    &[python, "main.py".into()],
                    &[("main.py", code.as_bytes())],
                    b"",
                )
            }
            _ => {
                let argv = self.command.clone().ok_or("command is not set up")?;
                let line = json!({"name": name, "arguments": args}).to_string() + "\n";
                let out = self.run(&argv, &[], line.as_bytes())?;
                command_output(&out)
            }
        }
    }

    /// Run a program in the sandbox: its stdout, or what went wrong.
    fn run(
        &self,
        argv: &[String],
        files: &[(&str, &[u8])],
        stdin: &[u8],
    ) -> Result<String, String> {
        let sandbox = self.sandbox.as_ref().ok_or("no sandbox")?;
        let o = sandbox.run(argv, files, stdin).map_err(|e| e.to_string())?;
        let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
        match o.status {
            Status::Exited(0) => Ok(stdout),
            Status::WallTimeout | Status::CpuTimeLimit => {
                Err(format!("timed out after {} s", self.params.timeout_s))
            }
            s => {
                let tail = o.stderr_tail(300);
                let last = tail.trim().lines().last().unwrap_or("").to_string();
                Err(format!("{s:?}: {last}"))
            }
        }
    }
}

/// The argument `key` of a call: `{"key": "…"}`, or the arguments themselves when a string.
fn argument(args: &Value, key: &str) -> Result<String, String> {
    match args {
        Value::String(s) => Ok(s.clone()),
        Value::Object(m) => m
            .get(key)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| format!("the arguments have no string \"{key}\"")),
        _ => Err(format!("expected arguments {{\"{key}\": \"…\"}}")),
    }
}

/// A `command` tool's answer: its first JSON line's `output` / `error`, else its stdout.
fn command_output(stdout: &str) -> Result<String, String> {
    let first = stdout.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    match serde_json::from_str::<Value>(first) {
        Ok(v) if v.get("error").is_some() => Err(text_of(&v["error"])),
        Ok(v) if v.get("output").is_some() => Ok(text_of(&v["output"])),
        _ => Ok(stdout.to_string()),
    }
}

fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// At most `n` characters of `s`, trimmed, with `…` when cut.
fn cut(s: &str, n: usize) -> String {
    let t = s.trim();
    match t.char_indices().nth(n) {
        Some((i, _)) => format!("{}…", &t[..i]),
        None => t.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inline() -> ToolBox {
        ToolBox::new(ToolParams {
            format: "inline".into(),
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn inline_calculator_answers_exactly_and_errors_come_back_as_text() {
        let t = inline();
        assert_eq!(
            t.closed_call("so <calc>8*4</calc> then"),
            Some("8*4".into())
        );
        assert_eq!(t.closed_call("so <calc>8*4"), None);
        assert_eq!(t.closed_call("8*4</calc>"), None);
        assert_eq!(t.respond("8*4"), ("<result>32</result>".into(), false));
        assert_eq!(
            t.respond(" (7 - 2) / 2 "),
            ("<result>5/2</result>".into(), false)
        );
        assert_eq!(
            t.respond("3/(2-2)"),
            ("<result>error: division by zero</result>".into(), true)
        );
        let (text, err) = t.respond("8 ^ 2");
        assert!(err && text.contains("unexpected character `^`"), "{text}");
        let (text, err) = t.respond("(1+2");
        assert!(err && text.contains("cannot parse"), "{text}");
    }

    #[test]
    fn hermes_calls_name_their_tool_and_malformed_calls_are_answered() {
        let t = ToolBox::new(ToolParams::default()).unwrap();
        let text = "<tool_call>{\"name\": \"calculator\", \"arguments\": {\"expression\": \"1+2*3\"}}</tool_call>";
        let call = t.closed_call(text).unwrap();
        assert_eq!(
            t.respond(&call),
            ("<tool_response>\n7\n</tool_response>".into(), false)
        );
        let string_args = r#"{"name": "calculator", "arguments": "10/4"}"#;
        assert_eq!(
            t.respond(string_args).0,
            "<tool_response>\n5/2\n</tool_response>"
        );
        let (text, err) = t.respond("{not json");
        assert!(err && text.contains("not JSON"), "{text}");
        let (text, err) = t.respond(r#"{"name": "search", "arguments": {}}"#);
        assert!(
            err && text.contains("unknown tool `search`; available: calculator"),
            "{text}"
        );
        let (text, err) = t.respond(r#"{"arguments": {}}"#);
        assert!(err && text.contains("no \"name\""), "{text}");
        let (text, err) = t.respond(r#"{"name": "calculator", "arguments": {"expr": "1"}}"#);
        assert!(err && text.contains("no string \"expression\""), "{text}");
    }

    #[test]
    fn bad_tool_tables_name_the_key() {
        let cases: [(ToolParams, &str); 5] = [
            (
                ToolParams {
                    format: "xml".into(),
                    ..Default::default()
                },
                "tools.format",
            ),
            (
                ToolParams {
                    names: vec!["search".into()],
                    ..Default::default()
                },
                "tools.names",
            ),
            (
                ToolParams {
                    max_calls: 0,
                    ..Default::default()
                },
                "tools.max_calls",
            ),
            (
                ToolParams {
                    timeout_s: 0.0,
                    ..Default::default()
                },
                "tools.timeout_s",
            ),
            (
                ToolParams {
                    names: vec!["command".into()],
                    ..Default::default()
                },
                "tools.command",
            ),
        ];
        for (p, key) in cases {
            let e = ToolBox::new(p).unwrap_err().to_string();
            assert!(e.starts_with(key), "{e}");
        }
    }

    #[test]
    fn long_outputs_are_cut() {
        assert_eq!(cut("  abcdef ", 3), "abc…");
        assert_eq!(cut("abc", 3), "abc");
    }
}
