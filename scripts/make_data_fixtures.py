"""Make the reference fixtures sobre-data's tests compare against.

Run: /opt/dvenv/bin/python scripts/make_data_fixtures.py
(needs `pip install transformers jinja2 pyarrow`; no torch)

1. Chat templates: runs scripts/make_chat_fixtures.py, which renders each template in
   crates/sobre-data/tests/fixtures/chat/*.json with transformers' own renderer and writes
   chat/expected.json. The Rust test renders the same templates with minijinja and asserts
   byte equality.
2. Parquet: writes two small files with pyarrow (Snappy, its default):
   verl_countdown.parquet (verl/TinyZero layout: prompt as a message list, nested
   reward_model.ground_truth.{target,numbers}, two row groups) and gsm8k.parquet
   (GSM8K layout: question / answer ending in `#### N`, one row with a bad answer type).
"""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
from transformers.utils.chat_template_utils import render_jinja_template

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "..", "crates", "sobre-data", "tests", "fixtures")

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
}

CASES = [
    # template, conversation, add_generation_prompt, extra variables
    ("qwen2.5", "system_user", True, {}),
    ("qwen2.5", "user_assistant_user", False, {}),
    ("qwen3", "system_user", True, {}),
    ("qwen3", "user_assistant_user", True, {"enable_thinking": False}),
    ("llama3.2", "system_user", True, {"date_string": "26 Jul 2024"}),
    ("llama3.2", "user_assistant_user", False, {"date_string": "01 Jan 2025"}),
]


def chat_fixtures():
    # chat/expected.json is made by make_chat_fixtures.py (its first cases are CASES above,
    # then the tool, reasoning and DeepSeek ones); one writer, so neither overwrites the other.
    import runpy

    runpy.run_path(os.path.join(os.path.dirname(__file__), "make_chat_fixtures.py"), run_name="__main__")


def parquet_fixtures():
    def row(i, nums, target):
        q = f"Using the numbers {nums}, create an equation that equals {target}."
        return {
            "data_source": "countdown",
            "prompt": [{"role": "user", "content": q}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": {"target": target, "numbers": nums}},
            "extra_info": {"split": "train", "index": i},
        }

    rows = [row(0, [3, 7, 15], 11), row(1, [2, 5, 9], 19), row(2, [4, 4, 8], 24)]
    table = pa.Table.from_pylist(rows)
    # Two row groups (2 rows + 1 row) so locations name a row group other than 0.
    pq.write_table(table, os.path.join(FIX, "verl_countdown.parquet"), row_group_size=2)

    gsm = pa.table(
        {
            "question": ["Tom has 3 apples and buys 4 more. How many?", "What is 1,000 + 234?", "Bad row"],
            "answer": ["3 + 4 = <<3+4=7>>7\n#### 7", "1000 + 234 = 1234\n#### 1,234", "no marker here"],
        }
    )
    pq.write_table(gsm, os.path.join(FIX, "gsm8k.parquet"))


if __name__ == "__main__":
    chat_fixtures()
    parquet_fixtures()
    print("wrote fixtures to", os.path.normpath(FIX))
