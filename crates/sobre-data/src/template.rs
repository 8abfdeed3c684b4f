//! Prompt templates: how a sample's prompt becomes the text the model continues.
//!
//! - [`Template::R1Zero`]: DeepSeek-R1-Zero's template (DeepSeek-R1 paper, Table 1; the same
//!   instruction TinyZero's `base` template and open-r1 use), with the prompt in place of
//!   `prompt`. The rendered text ends in `Assistant:`; completions start right after it.
//! - [`Template::Plain`]: the prompt text unchanged.
//! - [`Template::Chat`]: a Hugging Face chat template (`chat_template` from
//!   `tokenizer_config.json`) rendered with minijinja the way transformers'
//!   `apply_chat_template(..., tokenize=False)` renders it: `trim_blocks` and `lstrip_blocks` on,
//!   loop controls (`break`/`continue`), Python string and dict methods (`.strip()`,
//!   `.split()`, `.startswith()`, `.items()` via minijinja-contrib's pycompat),
//!   `raise_exception`, `strftime_now`, and transformers' `tojson` (Python `json.dumps` with
//!   `ensure_ascii=False`: no HTML escaping, `, ` and `: ` separators, Python's float repr,
//!   optional `indent`). Variables: `messages`, `add_generation_prompt`, `bos_token`,
//!   `eos_token`, `tools` (none unless [`ChatTemplate::with_tools`]), `documents` (none), plus
//!   any set with [`ChatTemplate::with_var`] (e.g. `date_string`, `enable_thinking`).
//!
//! Messages are [`Message`]s (role and content) or, for everything else templates read
//! (`reasoning_content`, `tool_calls`, `tool` turns, content `null`), any JSON objects as
//! [`ChatValue`]s, given to [`ChatTemplate::apply_chat`]. Like Python dicts, [`ChatValue`]s
//! parsed from JSON text keep their keys in the order written, so `tojson` prints tools and tool
//! arguments as transformers does.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Enumerator, Kwargs, Object, ObjectExt, ObjectRepr, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Value};
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::dataset::{Message, Prompt};

/// DeepSeek-R1-Zero's template; `{prompt}` is replaced by the question.
pub const R1_ZERO: &str = "A conversation between User and Assistant. The user asks a question, \
and the Assistant solves it. The assistant first thinks about the reasoning process in the mind \
and then provides the user with the answer. The reasoning process and answer are enclosed within \
<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process here \
</think> <answer> answer here </answer>. User: {prompt}. Assistant:";

/// Errors from rendering a template.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("the prompt has no user message for the {template} template")]
    NoUserMessage { template: &'static str },
    #[error("unknown template `{0}`: expected `r1_zero`, `plain` or `chat`")]
    UnknownName(String),
    #[error("chat template: {0:#}")]
    Jinja(#[from] Error),
    #[error("{path}: {message}")]
    Config { path: String, message: String },
}

/// A prompt template.
#[derive(Clone, Debug)]
pub enum Template {
    R1Zero,
    Plain,
    Chat(Arc<ChatTemplate>),
}

impl Template {
    /// `r1_zero` (also `r1-zero`, `r1`) or `plain`. Chat templates come from a tokenizer:
    /// [`ChatTemplate::from_tokenizer_config`].
    pub fn from_name(name: &str) -> Result<Template, TemplateError> {
        match name {
            "r1_zero" | "r1-zero" | "r1" => Ok(Template::R1Zero),
            "plain" => Ok(Template::Plain),
            other => Err(TemplateError::UnknownName(other.to_string())),
        }
    }

    /// Renders a prompt. R1-Zero and plain use the text prompt, or a conversation's last user
    /// message; chat templates get a text prompt as one user message, with the generation
    /// prompt added.
    pub fn render(&self, prompt: &Prompt) -> Result<String, TemplateError> {
        match self {
            Template::R1Zero => {
                let text = prompt.user_text().ok_or(TemplateError::NoUserMessage {
                    template: "r1_zero",
                })?;
                // The template supplies the period after the question; don't double it.
                let text = text.trim().strip_suffix('.').unwrap_or(text.trim());
                Ok(R1_ZERO.replace("{prompt}", text))
            }
            Template::Plain => prompt
                .user_text()
                .map(str::to_string)
                .ok_or(TemplateError::NoUserMessage { template: "plain" }),
            Template::Chat(chat) => {
                let messages = match prompt {
                    Prompt::Text(text) => vec![Message {
                        role: "user".into(),
                        content: text.clone(),
                    }],
                    Prompt::Messages(msgs) => msgs.clone(),
                };
                chat.apply(&messages, true)
            }
        }
    }
}

/// A compiled Hugging Face chat template and the variables it is rendered with.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    vars: BTreeMap<String, Value>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_len", &self.source.len())
            .field("vars", &self.vars.keys().collect::<Vec<_>>())
            .finish()
    }
}

const NAME: &str = "chat_template";

impl ChatTemplate {
    /// Compiles a template. `bos_token`/`eos_token` default to empty strings.
    pub fn new(source: impl Into<String>) -> Result<ChatTemplate, TemplateError> {
        let source = source.into();
        let mut env = Environment::new();
        // transformers renders with jinja2.Environment(trim_blocks=True, lstrip_blocks=True).
        env.set_syntax(
            SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.clone())?;
        let mut vars = BTreeMap::new();
        vars.insert("bos_token".to_string(), Value::from(""));
        vars.insert("eos_token".to_string(), Value::from(""));
        vars.insert("tools".to_string(), Value::from(()));
        vars.insert("documents".to_string(), Value::from(()));
        Ok(ChatTemplate { env, source, vars })
    }

    /// Sets `bos_token` and `eos_token`.
    pub fn with_special_tokens(mut self, bos: &str, eos: &str) -> ChatTemplate {
        self.vars.insert("bos_token".into(), Value::from(bos));
        self.vars.insert("eos_token".into(), Value::from(eos));
        self
    }

    /// Sets a template variable, as extra keyword arguments to `apply_chat_template` do. Takes a
    /// `&serde_json::Value` or a [`ChatValue`].
    pub fn with_var(mut self, name: &str, value: impl Into<ChatValue>) -> ChatTemplate {
        self.vars.insert(name.to_string(), value.into().0);
        self
    }

    /// Sets `tools`, as `apply_chat_template(tools=…)` does: a list of JSON-schema function
    /// descriptions (`{"type": "function", "function": {"name", "description", "parameters"}}`).
    /// Templates print them with `tojson`, so pass a [`ChatValue`] parsed from JSON text to keep
    /// their keys in the written order (a `serde_json::Value` has them sorted).
    pub fn with_tools(self, tools: impl Into<ChatValue>) -> ChatTemplate {
        self.with_var("tools", tools)
    }

    /// The template text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Reads `chat_template` (a string, or HF's list of named templates, taking `default`)
    /// and `bos_token`/`eos_token` from a `tokenizer_config.json`. `Ok(None)` when the file
    /// has no chat template. A `chat_template.jinja` next to it (transformers ≥ 4.43 writes
    /// one) wins over the JSON key.
    pub fn from_tokenizer_config(path: &Path) -> Result<Option<ChatTemplate>, TemplateError> {
        let cfg_err = |message: String| TemplateError::Config {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| cfg_err(e.to_string()))?;
        let cfg: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| cfg_err(format!("not valid JSON: {e}")))?;
        let jinja_file = path.with_file_name("chat_template.jinja");
        let source = if jinja_file.is_file() {
            Some(std::fs::read_to_string(&jinja_file).map_err(|e| cfg_err(e.to_string()))?)
        } else {
            match cfg.get("chat_template") {
                None | Some(serde_json::Value::Null) => None,
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(serde_json::Value::Array(named)) => named
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|t| t.get("template"))
                    .and_then(|t| t.as_str())
                    .map(str::to_string),
                Some(_) => {
                    return Err(cfg_err(
                        "`chat_template`: expected a string or a list of {name, template}".into(),
                    ));
                }
            }
        };
        let Some(source) = source else {
            return Ok(None);
        };
        let bos = special_token_text(cfg.get("bos_token")).unwrap_or_default();
        let eos = special_token_text(cfg.get("eos_token")).unwrap_or_default();
        Ok(Some(
            ChatTemplate::new(source)?.with_special_tokens(&bos, &eos),
        ))
    }

    /// Renders a conversation, like transformers'
    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=…)`.
    pub fn apply(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        let msgs: Vec<ChatValue> = messages.iter().map(ChatValue::from).collect();
        self.apply_chat(&msgs, add_generation_prompt)
    }

    /// Renders a conversation of arbitrary message objects, like transformers'
    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=…)`: messages may
    /// carry `reasoning_content`, `tool_calls` (`[{"type": "function", "function": {"name",
    /// "arguments"}}]`, arguments an object or a JSON string), `tool_call_id`, `name`, or
    /// anything else the template reads. They are normalized as transformers (5.x) normalizes
    /// them: keys whose value is `null` are dropped, and a message's reasoning (the first
    /// non-null of `reasoning_content`, `thinking`, `reasoning`) is also set as `thinking` and
    /// `reasoning_content`.
    pub fn apply_chat(
        &self,
        messages: &[ChatValue],
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        let msgs: Vec<Value> = messages.iter().map(|m| normalize_message(&m.0)).collect();
        let mut ctx: BTreeMap<String, Value> = self.vars.clone();
        ctx.insert("messages".into(), Value::from(msgs));
        ctx.insert(
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        );
        let tmpl = self.env.get_template(NAME)?;
        Ok(tmpl.render(Value::from_pairs(ctx))?)
    }
}

/// Names a message's reasoning goes under, as transformers' `_REASONING_FIELDS`.
const REASONING_FIELDS: [&str; 3] = ["reasoning_content", "thinking", "reasoning"];

/// transformers' `_normalize_chat_messages` then `_alias_reasoning_fields` for one message.
fn normalize_message(msg: &Value) -> Value {
    if msg.kind() != ValueKind::Map {
        return msg.clone();
    }
    let entries: Vec<(Value, Value)> = map_entries(msg)
        .into_iter()
        .filter(|(_, v)| !v.is_none() && !v.is_undefined())
        .collect();
    let reasoning = REASONING_FIELDS.iter().find_map(|field| {
        entries
            .iter()
            .find(|(k, _)| k.as_str() == Some(*field))
            .map(|(_, v)| v.clone())
    });
    let Some(reasoning) = reasoning else {
        return py_dict(entries);
    };
    // {"thinking": reasoning, **message, "reasoning_content": reasoning}
    let mut aliased = vec![(Value::from("thinking"), reasoning.clone())];
    for (k, v) in entries {
        dict_insert(&mut aliased, k, v);
    }
    dict_insert(&mut aliased, Value::from("reasoning_content"), reasoning);
    py_dict(aliased)
}

/// A map's entries in iteration order.
fn map_entries(map: &Value) -> Vec<(Value, Value)> {
    if let Some(dict) = map.downcast_object_ref::<PyDict>() {
        return dict.0.clone();
    }
    match map.try_iter() {
        Ok(keys) => keys
            .map(|k| {
                let v = map.get_item(&k).unwrap_or_default();
                (k, v)
            })
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// A map that keeps its keys in insertion order, as Python dicts do (minijinja's own maps sort
/// them unless built with `preserve_order`).
#[derive(Debug, Clone, Default)]
struct PyDict(Vec<(Value, Value)>);

impl Object for PyDict {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        self.mapped_enumerator(|this| Box::new(this.0.iter().map(|(k, _)| k.clone())))
    }

    fn enumerator_len(self: &Arc<Self>) -> Option<usize> {
        Some(self.0.len())
    }
}

/// `dict[key] = value`: replaces in place, or appends.
fn dict_insert(entries: &mut Vec<(Value, Value)>, key: Value, value: Value) {
    match entries.iter_mut().find(|(k, _)| *k == key) {
        Some(slot) => slot.1 = value,
        None => entries.push((key, value)),
    }
}

fn py_dict(entries: Vec<(Value, Value)>) -> Value {
    Value::from_object(PyDict(entries))
}

/// A value for a chat template (a message, the tool list, a variable) that keeps JSON objects'
/// keys in the order they were written, as the Python dicts transformers renders keep them.
///
/// Deserialize it from JSON text (`serde_json::from_str`, or a field of a struct deserialized
/// from text) to keep that order; from a `serde_json::Value` (whose objects are sorted, this
/// workspace builds serde_json without `preserve_order`) or a [`Message`] with `From`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChatValue(Value);

impl ChatValue {
    /// Parses JSON text, keeping object keys in document order.
    pub fn from_json_str(text: &str) -> Result<ChatValue, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// The minijinja value.
    pub fn as_value(&self) -> &Value {
        &self.0
    }
}

impl From<Value> for ChatValue {
    fn from(value: Value) -> ChatValue {
        ChatValue(value)
    }
}

impl From<ChatValue> for Value {
    fn from(value: ChatValue) -> Value {
        value.0
    }
}

impl From<&serde_json::Value> for ChatValue {
    fn from(value: &serde_json::Value) -> ChatValue {
        ChatValue(json_to_value(value))
    }
}

impl From<serde_json::Value> for ChatValue {
    fn from(value: serde_json::Value) -> ChatValue {
        ChatValue(json_to_value(&value))
    }
}

impl From<&Message> for ChatValue {
    fn from(m: &Message) -> ChatValue {
        ChatValue(py_dict(vec![
            (Value::from("role"), Value::from(m.role.as_str())),
            (Value::from("content"), Value::from(m.content.as_str())),
        ]))
    }
}

/// Serializes as JSON data, maps in their key order.
impl Serialize for ChatValue {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serialize_value(&self.0, serializer)
    }
}

fn serialize_value<S: Serializer>(v: &Value, serializer: S) -> Result<S::Ok, S::Error> {
    use serde::ser::{Error as _, SerializeMap, SerializeSeq};
    struct Ref<'a>(&'a Value);
    impl Serialize for Ref<'_> {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serialize_value(self.0, serializer)
        }
    }
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => serializer.serialize_unit(),
        ValueKind::Bool => serializer.serialize_bool(v.is_true()),
        ValueKind::Number if v.is_integer() => match v.as_i64() {
            Some(i) => serializer.serialize_i64(i),
            None => serializer.serialize_u64(u64::try_from(v.clone()).map_err(S::Error::custom)?),
        },
        ValueKind::Number => {
            serializer.serialize_f64(f64::try_from(v.clone()).map_err(S::Error::custom)?)
        }
        ValueKind::String => serializer.serialize_str(v.as_str().unwrap_or("")),
        ValueKind::Map => {
            let entries = map_entries(v);
            let mut map = serializer.serialize_map(Some(entries.len()))?;
            for (k, item) in &entries {
                match k.as_str() {
                    Some(k) => map.serialize_entry(k, &Ref(item))?,
                    None => map.serialize_entry(&k.to_string(), &Ref(item))?,
                }
            }
            map.end()
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter().map_err(S::Error::custom)?.collect();
            let mut seq = serializer.serialize_seq(Some(items.len()))?;
            for item in &items {
                seq.serialize_element(&Ref(item))?;
            }
            seq.end()
        }
        other => Err(S::Error::custom(format!("cannot serialize a {other:?}"))),
    }
}

impl<'de> Deserialize<'de> for ChatValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<ChatValue, D::Error> {
        deserializer
            .deserialize_any(ChatValueVisitor)
            .map(ChatValue)
    }
}

struct ChatValueVisitor;

impl<'de> Visitor<'de> for ChatValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::from(()))
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::from(()))
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(ChatValueVisitor)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(ChatValue(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::from(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0));
        while let Some((key, ChatValue(value))) = map.next_entry::<String, ChatValue>()? {
            // json.loads keeps the last value of a repeated key, at the first one's place.
            dict_insert(&mut entries, Value::from(key), value);
        }
        Ok(py_dict(entries))
    }
}

/// The text of a special token in `tokenizer_config.json`: a string or `{"content": …}`.
pub fn special_token_text(value: Option<&serde_json::Value>) -> Option<String> {
    match value? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(obj) => obj.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// serde_json → minijinja, keeping object key order as serde_json iterates it (sorted, without
/// serde_json's `preserve_order`; parse a [`ChatValue`] from text to keep the written order).
pub fn json_to_value(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::from(()),
        serde_json::Value::Bool(b) => Value::from(*b),
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                Value::from(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        serde_json::Value::String(s) => Value::from(s.as_str()),
        serde_json::Value::Array(items) => items.iter().map(json_to_value).collect(),
        serde_json::Value::Object(map) => py_dict(
            map.iter()
                .map(|(k, v)| (Value::from(k.as_str()), json_to_value(v)))
                .collect(),
        ),
    }
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)`.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let (item_sep, key_sep) = match separators {
        Some(s) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be a pair",
            ));
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let opts = JsonOpts {
        indent,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
        item_sep,
        key_sep,
    };
    let mut out = String::new();
    write_json(value, &opts, 0, &mut out)?;
    // Safe: templates insert it verbatim (HF templates are not HTML-escaped anyway).
    Ok(Value::from_safe_string(out))
}

struct JsonOpts {
    indent: Option<usize>,
    sort_keys: bool,
    ensure_ascii: bool,
    item_sep: String,
    key_sep: String,
}

fn json_string(s: &str, ensure_ascii: bool) -> String {
    let quoted = serde_json::Value::String(s.to_string()).to_string();
    if !ensure_ascii {
        return quoted;
    }
    let mut out = String::with_capacity(quoted.len());
    for ch in quoted.chars() {
        if ch.is_ascii() {
            out.push(ch);
        } else {
            let mut buf = [0u16; 2];
            for unit in ch.encode_utf16(&mut buf) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

/// Python's `repr(float)` as `json.dumps` writes it: the shortest round-trip digits, `x.0` for
/// whole numbers, exponent form (`1e-05`, `1e+16`) below 1e-4 and from 1e16, `NaN`/`Infinity`.
fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    // Rust's `Debug` switches to exponent form at the same thresholds as Python's repr; only the
    // exponent is written differently (`1e-5` vs `1e-05`, `1e16` vs `1e+16`).
    let s = format!("{f:?}");
    match s.split_once('e') {
        Some((mantissa, exp)) => {
            let (sign, digits) = match exp.strip_prefix('-') {
                Some(d) => ('-', d),
                None => ('+', exp),
            };
            format!("{mantissa}e{sign}{digits:0>2}")
        }
        None => s,
    }
}

fn newline_indent(opts: &JsonOpts, level: usize, out: &mut String) {
    if let Some(n) = opts.indent {
        out.push('\n');
        out.push_str(&" ".repeat(n * level));
    }
}

fn write_json(v: &Value, opts: &JsonOpts, level: usize, out: &mut String) -> Result<(), Error> {
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number if v.is_integer() => out.push_str(&v.to_string()),
        ValueKind::Number => out.push_str(&python_float(f64::try_from(v.clone())?)),
        ValueKind::String => {
            out.push_str(&json_string(v.as_str().unwrap_or(""), opts.ensure_ascii))
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if opts.sort_keys {
                keys.sort();
            }
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline_indent(opts, level + 1, out);
                let k = match key.as_str() {
                    Some(s) => s.to_string(),
                    None => key.to_string(),
                };
                out.push_str(&json_string(&k, opts.ensure_ascii));
                out.push_str(&opts.key_sep);
                write_json(&v.get_item(key)?, opts, level + 1, out)?;
            }
            newline_indent(opts, level, out);
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline_indent(opts, level + 1, out);
                write_json(item, opts, level + 1, out)?;
            }
            newline_indent(opts, level, out);
            out.push(']');
        }
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: cannot serialize a {:?}", v.kind()),
            ));
        }
    }
    Ok(())
}

/// transformers' `strftime_now(format)`: the current time (UTC here; transformers uses local
/// time) formatted with the common strftime codes `%Y %y %m %d %e %B %b %A %a %H %M %S %%`.
fn strftime_now(format: String) -> Result<Value, Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime(secs, &format).map(Value::from)
}

/// Formats Unix time `secs` (UTC).
pub fn strftime(secs: i64, format: &str) -> Result<String, Error> {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let weekday = DAYS[days.rem_euclid(7) as usize];
    let month_name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:2}")),
            Some('B') => out.push_str(month_name),
            Some('b') => out.push_str(&month_name[..3]),
            Some('A') => out.push_str(weekday),
            Some('a') => out.push_str(&weekday[..3]),
            Some('H') => out.push_str(&format!("{:02}", tod / 3600)),
            Some('M') => out.push_str(&format!("{:02}", tod / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", tod % 60)),
            Some('%') => out.push('%'),
            other => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!(
                        "strftime_now: unsupported format code %{}",
                        other.unwrap_or(' ')
                    ),
                ));
            }
        }
    }
    Ok(out)
}

/// Days since 1970-01-01 → (year, month, day), Howard Hinnant's `civil_from_days`.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_tojson_writes_floats_as_python_json_dumps() {
        // json.dumps([0.0001, 1e15, 1.5e16, -0.0, 1.2345678901234568e17, 1e-7, 123.456, 1e100,
        //             5e-324, 0.1 + 0.2, nan, -inf])
        let floats = [
            0.0001,
            1e15,
            1.5e16,
            -0.0,
            1.2345678901234568e17,
            1e-7,
            123.456,
            1e100,
            5e-324,
            0.1 + 0.2,
            f64::NAN,
            f64::NEG_INFINITY,
        ];
        let got: Vec<String> = floats.iter().map(|&f| python_float(f)).collect();
        assert_eq!(
            got.join(", "),
            "0.0001, 1000000000000000.0, 1.5e+16, -0.0, 1.2345678901234568e+17, 1e-07, \
             123.456, 1e+100, 5e-324, 0.30000000000000004, NaN, -Infinity"
        );
    }

    #[test]
    fn template_chat_values_round_trip_through_serde() {
        let text = r#"{"role":"assistant","content":null,"tool_calls":[{"function":{"name":"f","arguments":{"b":1.5,"a":[true,-3,18446744073709551615]}}}]}"#;
        let v = ChatValue::from_json_str(text).unwrap();
        assert_eq!(serde_json::to_string(&v).unwrap(), text);
        // `Message`s become {role, content} in that order.
        let m = ChatValue::from(&Message {
            role: "user".into(),
            content: "hi".into(),
        });
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"role":"user","content":"hi"}"#
        );
    }
}
