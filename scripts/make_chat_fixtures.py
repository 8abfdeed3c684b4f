"""Regenerate crates/sobre-data/tests/fixtures/chat/expected.json with transformers' own renderer.

Run: target/hf-venv/bin/python scripts/make_chat_fixtures.py
(needs `pip install transformers jinja2`; no torch, no network)

Each template in crates/sobre-data/tests/fixtures/chat/<name>.json (a minimal tokenizer_config.json:
chat_template, bos_token, eos_token) is rendered for the conversations below the way
`tokenizer.apply_chat_template(messages, tools=..., tokenize=False, add_generation_prompt=...,
**vars)` renders it: the messages are normalized as apply_chat_template normalizes them (keys whose
value is None are dropped), the special tokens and the extra variables become template variables,
and `render_jinja_template` (the code behind apply_chat_template) renders them. The Rust test
(`hf_templates_render_exactly_as_transformers` in crates/sobre-data/tests/templates.rs) renders the
same cases with minijinja and asserts byte equality.

Cases are written in order; the first six are the original ones and must stay first. Object keys are
written in the order the dicts here have them: Python keeps insertion order, and so must the Rust
side (it reads these files with `ChatValue`, which keeps it).

Templates (copied verbatim from the models' tokenizer_config.json on the Hugging Face Hub):
- qwen2.5: Qwen/Qwen2.5-*-Instruct (ChatML, tools in the system message)
- qwen3: Qwen/Qwen3-* (enable_thinking, reasoning_content, namespace/loop.last logic)
- llama3.2: meta-llama/Llama-3.2-*-Instruct (header tokens, date_string, tools)
- deepseek-r1-distill-qwen: deepseek-ai/DeepSeek-R1-Distill-Qwen-* (the template after the
  "<think>\\n" generation-prompt update, commit 3865e12 of DeepSeek-R1-Distill-Qwen-32B)
- deepseek-r1: deepseek-ai/DeepSeek-R1 (the 671B model; `'tool_calls' in message`, system prompts
  joined, earlier <think> stripped)
"""

import json
import os

from transformers.utils import chat_template_utils as ctu

HERE = os.path.dirname(os.path.abspath(__file__))
CHAT = os.path.join(HERE, "..", "crates", "sobre-data", "tests", "fixtures", "chat")


def special_token(value):
    """A special token in tokenizer_config.json: a string, {"content": ...}, or null."""
    if isinstance(value, dict):
        return value.get("content") or ""
    return value or ""


# JSON-schema tool descriptions, as apply_chat_template(tools=...) takes them. The keys are in a
# natural, not alphabetical, order on purpose: templates print them with tojson.
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "evaluate",
            "description": "Evaluate an arithmetic expression exactly, e.g. (15 - 7) * 3.",
            "parameters": {
                "type": "object",
                "properties": {
                    "expression": {"type": "string", "description": "Uses + - * / and parentheses."},
                    "digits": {"type": "integer", "description": "Decimal places to round to.", "default": 0},
                },
                "required": ["expression"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current temperature in °C for a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "precision": {"type": "number", "default": 0.5, "minimum": 1e-06},
                },
                "required": ["city"],
            },
        },
    },
]


def call(name, arguments):
    """An OpenAI-style tool call; `arguments` is an object or a JSON string."""
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


CONVERSATIONS = {
    "system_user": [
        {"role": "system", "content": "You are a careful solver."},
        {"role": "user", "content": "Using the numbers [3, 7, 15], make 11."},
    ],
    "user_assistant_user": [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "<think>\n2 + 3 = 5\n</think>\n<answer>\n5\n</answer>"},
        {"role": "user", "content": "  And 4 * 6?  "},
    ],
    # Qwen3: reasoning_content on an earlier turn (dropped: it precedes the last query) and
    # <think> inside the last turn's content (parsed with split/rstrip/lstrip, kept: loop.last).
    "reasoning_multi_turn": [
        {"role": "system", "content": "You are a careful solver."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "reasoning_content": "2 + 3 = 5", "content": "<answer>5</answer>"},
        {"role": "user", "content": "And 4 * 6?"},
        {"role": "assistant", "content": "<think>\n\n4 * 6 = 24\n\n</think>\n\n\n<answer>24</answer>"},
    ],
    # A tool round trip: object arguments (keys out of alphabetical order), a string of JSON
    # arguments, two calls in one turn, consecutive tool responses, content None on a call turn.
    "tool_round_trip": [
        {"role": "system", "content": "You are a careful solver."},
        {"role": "user", "content": "Using the numbers [3, 7, 15], make 24."},
        {"role": "assistant", "content": None, "tool_calls": [call("evaluate", {"expression": "(15 - 7) * 3", "digits": 0})]},
        {"role": "tool", "content": "24"},
        {"role": "assistant", "content": "(15 - 7) * 3 = 24"},
        {"role": "user", "content": "And the weather in Zürich?"},
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [call("get_weather", "{\"city\": \"Zürich\"}"), call("evaluate", {"expression": "1 + 1"})],
        },
        {"role": "tool", "content": "{\"temp\": 21.5}"},
        {"role": "tool", "content": "2"},
    ],
    # Qwen3 multi-step tool use: reasoning on the call turn and the final turn, both after the
    # last real user query (ns.multi_step_tool / last_query_index).
    "reasoning_tool_steps": [
        {"role": "user", "content": "Using the numbers [3, 7, 15], make 24."},
        {
            "role": "assistant",
            "reasoning_content": "Try (15 - 7) * 3.",
            "content": "",
            "tool_calls": [call("evaluate", {"expression": "(15 - 7) * 3"})],
        },
        {"role": "tool", "content": "24"},
        {"role": "assistant", "reasoning_content": "\nThe tool confirms 24.\n", "content": "\n(15 - 7) * 3 = 24"},
    ],
    # Llama 3.2 takes one tool call per turn, and tool results as `ipython` turns.
    "single_tool_call": [
        {"role": "system", "content": "You are a careful solver."},
        {"role": "user", "content": " Using the numbers [3, 7, 15], make 24. "},
        {"role": "assistant", "tool_calls": [call("evaluate", {"expression": "(15 - 7) * 3", "digits": 0})]},
        {"role": "tool", "content": "24"},
    ],
    # DeepSeek: earlier <think> … </think> is cut with split('</think>')[-1].
    "think_multi_turn": [
        {"role": "system", "content": "You are a careful solver."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "<think>\n2 + 3 = 5\n</think>\n\nThe answer is 5."},
        {"role": "user", "content": "And 4 * 6?"},
    ],
    # DeepSeek tool outputs (the distill template only renders calls of content-less turns, which
    # apply_chat_template drops content None from; so calls show in the R1 case only).
    "deepseek_tools": [
        {"role": "system", "content": "You are a careful solver."},
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Using the numbers [3, 7, 15], make 24."},
        {
            "role": "assistant",
            "content": "Let me check both.",
            "tool_calls": [
                call("evaluate", "{\"expression\": \"(15 - 7) * 3\"}"),
                call("evaluate", "{\"expression\": \"15 + 7 + 3\"}"),
            ],
        },
        {"role": "tool", "content": "24"},
        {"role": "tool", "content": "25"},
        {"role": "assistant", "content": "<think>\nThe first works.\n</think>\n\n(15 - 7) * 3 = 24"},
        {"role": "user", "content": "And 4 * 6?"},
    ],
}

CASES = [
    # template, conversation, add_generation_prompt, extra variables, tools
    # -- the original six --
    ("qwen2.5", "system_user", True, {}, None),
    ("qwen2.5", "user_assistant_user", False, {}, None),
    ("qwen3", "system_user", True, {}, None),
    ("qwen3", "user_assistant_user", True, {"enable_thinking": False}, None),
    ("llama3.2", "system_user", True, {"date_string": "26 Jul 2024"}, None),
    ("llama3.2", "user_assistant_user", False, {"date_string": "01 Jan 2025"}, None),
    # -- Qwen3 thinking switch, reasoning_content, loop.last / namespace logic --
    ("qwen3", "system_user", True, {"enable_thinking": True}, None),
    ("qwen3", "system_user", True, {"enable_thinking": False}, None),
    ("qwen3", "reasoning_multi_turn", False, {}, None),
    ("qwen3", "reasoning_multi_turn", True, {"enable_thinking": False}, None),
    # -- tools --
    ("qwen2.5", "tool_round_trip", True, {}, TOOLS),
    ("qwen2.5", "user_assistant_user", True, {}, TOOLS[:1]),
    ("qwen3", "tool_round_trip", True, {"enable_thinking": False}, TOOLS),
    ("qwen3", "reasoning_tool_steps", False, {}, TOOLS[:1]),
    ("llama3.2", "single_tool_call", True, {"date_string": "26 Jul 2024"}, TOOLS),
    ("llama3.2", "single_tool_call", True, {"date_string": "26 Jul 2024", "tools_in_user_message": False}, TOOLS[:1]),
    # -- DeepSeek --
    ("deepseek-r1-distill-qwen", "system_user", True, {}, None),
    ("deepseek-r1-distill-qwen", "think_multi_turn", True, {}, None),
    ("deepseek-r1-distill-qwen", "deepseek_tools", False, {}, None),
    ("deepseek-r1", "think_multi_turn", True, {}, None),
    ("deepseek-r1", "deepseek_tools", True, {}, None),
    ("deepseek-r1", "user_assistant_user", False, {}, None),
]


def render(cfg, messages, add_generation_prompt, extra, tools):
    """What `apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=...,
    **extra)` returns for a tokenizer with this config."""
    normalize = getattr(ctu, "_normalize_chat_messages", None)
    conversation = normalize(messages) if normalize else messages
    # apply_chat_template passes {**special_tokens_map, **kwargs}; a token the config leaves null is
    # passed as "" here, as sobre's ChatTemplate does.
    kwargs = {"bos_token": special_token(cfg.get("bos_token")), "eos_token": special_token(cfg.get("eos_token"))}
    kwargs.update(extra)
    rendered, _ = ctu.render_jinja_template(
        conversations=[conversation],
        tools=tools,
        documents=None,
        chat_template=cfg["chat_template"],
        add_generation_prompt=add_generation_prompt,
        **kwargs,
    )
    return rendered[0]


def main():
    out = []
    for name, conv, gen, extra, tools in CASES:
        with open(os.path.join(CHAT, f"{name}.json"), encoding="utf-8") as f:
            cfg = json.load(f)
        case = {
            "template": name,
            "messages": CONVERSATIONS[conv],
            "add_generation_prompt": gen,
            "vars": extra,
        }
        if tools is not None:
            case["tools"] = tools
        case["expected"] = render(cfg, CONVERSATIONS[conv], gen, extra, tools)
        out.append(case)
    path = os.path.join(CHAT, "expected.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {len(out)} cases to {os.path.normpath(path)}")


if __name__ == "__main__":
    main()
