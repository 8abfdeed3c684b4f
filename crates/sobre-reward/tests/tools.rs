//! The sandboxed tools: `python` runs code and returns its stdout, a program that hangs is cut
//! at `timeout_s` and answered with an error, and `command` speaks one JSON line each way.
//!
//! Skipped (with a printed reason) where `python3` is absent.

use std::time::{Duration, Instant};

use sobre_reward::sandbox::resolve_program;
use sobre_reward::tools::{ToolBox, ToolParams};

fn have_python() -> bool {
    let ok = resolve_program("python3").is_some();
    if !ok {
        eprintln!("skipped: python3 not found");
    }
    ok
}

#[test]
fn python_tool_returns_stdout_and_a_hanging_program_is_cut_at_its_limit() {
    if !have_python() {
        return;
    }
    let t = ToolBox::new(ToolParams {
        names: vec!["python".into(), "calculator".into()],
        timeout_s: 1.0,
        ..Default::default()
    })
    .unwrap();
    let call = r#"{"name": "python", "arguments": {"code": "print(sum(range(10)))"}}"#;
    assert_eq!(
        t.respond(call),
        ("<tool_response>\n45\n</tool_response>".into(), false)
    );
    let raising = r#"{"name": "python", "arguments": {"code": "raise ValueError('no')"}}"#;
    let (text, err) = t.respond(raising);
    assert!(err && text.contains("ValueError: no"), "{text}");
    let start = Instant::now();
    let hang = r#"{"name": "python", "arguments": {"code": "while True: pass"}}"#;
    let (text, err) = t.respond(hang);
    let took = start.elapsed();
    assert!(err && text.contains("timed out after 1 s"), "{text}");
    assert!(took < Duration::from_secs(5), "cut after {took:?}");
    // The calculator still answers after a hang.
    let calc = r#"{"name": "calculator", "arguments": {"expression": "6*7"}}"#;
    assert_eq!(t.respond(calc).0, "<tool_response>\n42\n</tool_response>");
}

#[test]
fn command_tool_speaks_json_lines() {
    if !have_python() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("tool.py");
    std::fs::write(
        &script,
        "import json, sys\n\
         req = json.loads(sys.stdin.readline())\n\
         q = req['arguments'].get('q', '')\n\
         if q == 'fail':\n    print(json.dumps({'error': 'no such thing'}))\n\
         else:\n    print(json.dumps({'output': req['name'] + ':' + q.upper()}))\n",
    )
    .unwrap();
    // (The sandbox's private filesystem may not show the temp dir: the script goes in `-c`.)
    let code = std::fs::read_to_string(&script).unwrap();
    let t = ToolBox::new(ToolParams {
        names: vec!["command".into()],
        command: vec!["python3".into(), "-c".into(), code],
        ..Default::default()
    })
    .unwrap();
    let (text, err) = t.respond(r#"{"name": "command", "arguments": {"q": "abc"}}"#);
    assert_eq!(
        (text.as_str(), err),
        ("<tool_response>\ncommand:ABC\n</tool_response>", false)
    );
    let (text, err) = t.respond(r#"{"name": "command", "arguments": {"q": "fail"}}"#);
    assert!(err && text.contains("error: no such thing"), "{text}");
}
