//! Prompt templates: R1-Zero, plain, and HF chat templates against transformers' renderings.

use std::path::Path;

use serde_json::Value;
use sobre_data::template::{ChatTemplate, R1_ZERO, Template, TemplateError, strftime};
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

#[test]
fn hf_templates_render_exactly_as_transformers() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat");
    let cases: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    assert_eq!(cases.len(), 6);
    for case in cases {
        let name = case["template"].as_str().unwrap();
        let mut tmpl = ChatTemplate::from_tokenizer_config(&dir.join(format!("{name}.json")))
            .unwrap()
            .unwrap();
        for (k, v) in case["vars"].as_object().unwrap() {
            tmpl = tmpl.with_var(k, v);
        }
        let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
        let got = tmpl
            .apply(&messages, case["add_generation_prompt"].as_bool().unwrap())
            .unwrap();
        assert_eq!(got, case["expected"].as_str().unwrap(), "template {name}");
    }
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
        .with_var("t", &serde_json::json!({"name": "f", "args": [1, 2.5, "<é>"], "ok": true, "none": null}))
        .with_var("e", &serde_json::json!([]));
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
