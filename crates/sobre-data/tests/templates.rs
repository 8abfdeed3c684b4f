//! Prompt templates: R1-Zero, plain, and HF chat templates against transformers' renderings.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use sobre_data::template::{ChatTemplate, ChatValue, R1_ZERO, Template, TemplateError, strftime};
use sobre_data::{Message, Prompt};

#[test]
fn r1_zero_template_text() {
    let out = Template::R1Zero
        .render(&Prompt::Text("What is 2 + 3?".into()))
        .unwrap();
    assert_eq!(
        out,
        "A conversation between User and Assistant. The user asks a question, and the Assistant \
         solves it. The assistant first thinks about the reasoning process in the mind and then \
         provides the user with the answer. The reasoning process and answer are enclosed within \
         <think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning \
         process here </think> <answer> answer here </answer>. User: What is 2 + 3?. Assistant:"
    );
    // A trailing period is not doubled; a conversation contributes its last user message.
    let msgs = Prompt::Messages(vec![
        Message {
            role: "user".into(),
            content: "first".into(),
        },
        Message {
            role: "assistant".into(),
            content: "x".into(),
        },
        Message {
            role: "user".into(),
            content: "Make 24.".into(),
        },
    ]);
    assert!(
        Template::R1Zero
            .render(&msgs)
            .unwrap()
            .ends_with("User: Make 24. Assistant:")
    );
    assert_eq!(Template::Plain.render(&msgs).unwrap(), "Make 24.");
    assert!(R1_ZERO.contains("{prompt}"));
    let none = Prompt::Messages(vec![Message {
        role: "system".into(),
        content: "s".into(),
    }]);
    assert!(matches!(
        Template::Plain.render(&none),
        Err(TemplateError::NoUserMessage { .. })
    ));
    assert!(matches!(
        Template::from_name("r1_zero"),
        Ok(Template::R1Zero)
    ));
    assert!(Template::from_name("chatml").is_err());
}

/// One case of `tests/fixtures/chat/expected.json` (written by `scripts/make_chat_fixtures.py`).
/// `ChatValue`s keep the JSON's key order, as the Python dicts transformers rendered did.
#[derive(Deserialize)]
struct Case {
    template: String,
    messages: Vec<ChatValue>,
    add_generation_prompt: bool,
    vars: BTreeMap<String, ChatValue>,
    #[serde(default)]
    tools: Option<ChatValue>,
    expected: String,
}

#[test]
fn hf_templates_render_exactly_as_transformers() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat");
    let cases: Vec<Case> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    assert_eq!(cases.len(), 22);
    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let name = &case.template;
        let mut tmpl = ChatTemplate::from_tokenizer_config(&dir.join(format!("{name}.json")))
            .unwrap()
            .unwrap();
        for (k, v) in &case.vars {
            tmpl = tmpl.with_var(k, v.clone());
        }
        if let Some(tools) = &case.tools {
            tmpl = tmpl.with_tools(tools.clone());
        }
        match tmpl.apply_chat(&case.messages, case.add_generation_prompt) {
            Ok(got) if got == case.expected => {}
            Ok(got) => failures.push(format!(
                "case {i} ({name}):\n--- expected\n{}\n--- got\n{got}",
                case.expected
            )),
            Err(e) => failures.push(format!("case {i} ({name}): {e}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    // The first six cases only have role/content messages: `apply` renders them the same.
    for case in &cases[..6] {
        let messages: Vec<Message> =
            serde_json::from_value(serde_json::to_value(&case.messages).unwrap()).unwrap();
        let mut tmpl =
            ChatTemplate::from_tokenizer_config(&dir.join(format!("{}.json", case.template)))
                .unwrap()
                .unwrap();
        for (k, v) in &case.vars {
            tmpl = tmpl.with_var(k, v.clone());
        }
        assert_eq!(
            tmpl.apply(&messages, case.add_generation_prompt).unwrap(),
            case.expected
        );
    }
}

#[test]
fn chat_values_keep_key_order_and_messages_are_normalized_like_transformers() {
    // Keys in written order (Python dict order), not sorted; floats as Python's repr.
    let tools = ChatValue::from_json_str(
        r#"[{"type": "function", "function": {"name": "f", "parameters": {"z": 1, "a": [0.5, 1e-06, 1e16, 2.0, 100]}}}]"#,
    )
    .unwrap();
    let out = ChatTemplate::new("{% for t in tools %}{{ t | tojson }}{% endfor %}")
        .unwrap()
        .with_tools(tools)
        .apply(&[], false)
        .unwrap();
    assert_eq!(
        out,
        r#"{"type": "function", "function": {"name": "f", "parameters": {"z": 1, "a": [0.5, 1e-06, 1e+16, 2.0, 100]}}}"#
    );
    // A repeated key keeps its first place and its last value, as json.loads does.
    let v = ChatValue::from_json_str(r#"{"b": 1, "a": 2, "b": 3}"#).unwrap();
    let out = ChatTemplate::new("{{ v | tojson }} {{ v.items() | list | length }}")
        .unwrap()
        .with_var("v", v)
        .apply(&[], false)
        .unwrap();
    assert_eq!(out, r#"{"b": 3, "a": 2} 2"#);

    // null keys are dropped (so `content` is undefined, not none), reasoning is aliased to
    // `thinking` and `reasoning_content`, other keys keep their order.
    let msgs: Vec<ChatValue> = serde_json::from_str(
        r#"[{"role": "assistant", "content": null, "reasoning": "r", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {"y": 1, "x": 2}}}]}]"#,
    )
    .unwrap();
    let src = "{% for m in messages %}{{ m.keys() | list | join(',') }}|{{ 'content' in m }}|\
               {{ m.content is defined }}|{{ m.thinking }}{{ m.reasoning_content }}|\
               {{ m.tool_calls[0].function.arguments | tojson }}{% endfor %}";
    let out = ChatTemplate::new(src)
        .unwrap()
        .apply_chat(&msgs, false)
        .unwrap();
    assert_eq!(
        out,
        r#"thinking,role,reasoning,tool_calls,reasoning_content|False|False|rr|{"y": 1, "x": 2}"#
    );
    // A serde_json::Value converts too (its objects have sorted keys).
    let from_json = ChatValue::from(&serde_json::json!({"role": "user", "content": "hi"}));
    assert_eq!(
        ChatTemplate::new("{{ messages[0] | tojson }}")
            .unwrap()
            .apply_chat(&[from_json], false)
            .unwrap(),
        r#"{"content": "hi", "role": "user"}"#
    );
}

#[test]
fn chat_template_wraps_a_text_prompt_as_one_user_message() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat");
    let tmpl = ChatTemplate::from_tokenizer_config(&dir.join("qwen3.json"))
        .unwrap()
        .unwrap();
    let out = Template::Chat(tmpl.into())
        .render(&Prompt::Text("Hi".into()))
        .unwrap();
    assert_eq!(
        out,
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
}

fn render(src: &str) -> Result<String, TemplateError> {
    let msgs = vec![
        Message {
            role: "system".into(),
            content: " sys ".into(),
        },
        Message {
            role: "user".into(),
            content: "hello".into(),
        },
        Message {
            role: "assistant".into(),
            content: "yo".into(),
        },
    ];
    ChatTemplate::new(src)?
        .with_special_tokens("<s>", "</s>")
        .apply(&msgs, true)
}

#[test]
fn loop_controls_pycompat_and_variables() {
    let src = "{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}\
               {{ m.role.upper() }}={{ m['content'].strip() }};{% if m.role == 'user' %}{% break %}{% endif %}\
               {% endfor %}{% if add_generation_prompt %}>{% endif %}{{ eos_token }}{{ tools is none }}";
    assert_eq!(render(src).unwrap(), "<s>USER=hello;></s>True");
    let src = "{{ messages[0].content.startswith(' s') }} {{ messages|length }} {{ messages[::-1][0].role }}";
    assert_eq!(render(src).unwrap(), "True 3 assistant");
}

#[test]
fn raise_exception_is_an_error_with_its_message() {
    let err = render("{{ raise_exception('Conversation roles must alternate') }}").unwrap_err();
    assert!(
        err.to_string()
            .contains("Conversation roles must alternate"),
        "{err}"
    );
}

#[test]
fn tojson_matches_python_json_dumps() {
    let tmpl = ChatTemplate::new("{{ t | tojson }}|{{ t | tojson(indent=2) }}|{{ e | tojson }}|{{ t | tojson(sort_keys=true) }}")
        .unwrap()
        .with_var("t", serde_json::json!({"name": "f", "args": [1, 2.5, "<é>"], "ok": true, "none": null}))
        .with_var("e", serde_json::json!([]));
    let out = tmpl.apply(&[], false).unwrap();
    // serde_json orders these keys alphabetically (no preserve_order), as Python would for a
    // dict built in that order.
    assert_eq!(
        out,
        "{\"args\": [1, 2.5, \"<é>\"], \"name\": \"f\", \"none\": null, \"ok\": true}|{\n  \"args\": [\n    1,\n    2.5,\n    \"<é>\"\n  ],\n  \"name\": \"f\",\n  \"none\": null,\n  \"ok\": true\n}|[]|{\"args\": [1, 2.5, \"<é>\"], \"name\": \"f\", \"none\": null, \"ok\": true}"
    );
}

#[test]
fn strftime_formats_like_python() {
    // 2024-07-26 13:05:09 UTC, a Friday.
    let t = 1_721_999_109;
    assert_eq!(strftime(t, "%d %b %Y").unwrap(), "26 Jul 2024");
    assert_eq!(
        strftime(t, "%A %B %e %H:%M:%S %y %m %%").unwrap(),
        "Friday July 26 13:05:09 24 07 %"
    );
    assert_eq!(strftime(0, "%Y-%m-%d %a").unwrap(), "1970-01-01 Thu");
    let now = ChatTemplate::new("{{ strftime_now('%Y') }}")
        .unwrap()
        .apply(&[], false)
        .unwrap();
    assert!(now.parse::<i32>().unwrap() >= 2025);
}
