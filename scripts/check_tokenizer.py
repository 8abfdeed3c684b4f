"""Check that transformers loads a tokenizer sobre wrote and encodes/decodes exactly as sobre does.

Usage:
    SOBRE_TOKENIZER_OUT=/tmp/tok cargo test -p sobre-data --test tokenizer export
    python scripts/check_tokenizer.py /tmp/tok          # needs `pip install transformers`

Loads DIR with both `PreTrainedTokenizerFast.from_pretrained` and `AutoTokenizer`, checks the
special tokens, and for every {text, ids} in DIR/parity.json (ids computed by sobre-data) checks
that transformers gives the same ids (no special tokens added) and decodes them back to the text.
Any directory with a tokenizer.json works without parity.json; then only the load and a
round-trip of a few strings are checked.
"""

import json
import os
import sys

from transformers import AutoTokenizer, PreTrainedTokenizerFast


def main(path):
    fast = PreTrainedTokenizerFast.from_pretrained(path)
    auto = AutoTokenizer.from_pretrained(path)
    print(f"loaded {type(fast).__name__} and {type(auto).__name__}: vocab {len(fast)}")
    assert fast.eos_token == "<|endoftext|>" and fast.eos_token_id == 0, (fast.eos_token, fast.eos_token_id)
    assert fast.pad_token == "<|pad|>" and fast.pad_token_id == 1, (fast.pad_token, fast.pad_token_id)
    assert fast.convert_tokens_to_ids(["<think>", "</think>", "<answer>", "</answer>"]) == [2, 3, 4, 5]

    parity = os.path.join(path, "parity.json")
    cases = json.load(open(parity)) if os.path.exists(parity) else [
        {"text": t, "ids": None} for t in ["<think>\n1 + 2 = 3\n</think>\n<answer>\n3\n</answer>", "héllo ✓"]
    ]
    for case in cases:
        for tok in (fast, auto):
            ids = tok.encode(case["text"], add_special_tokens=False)
            if case["ids"] is not None and ids != case["ids"]:
                sys.exit(f"id mismatch for {case['text']!r}:\n  transformers {ids}\n  sobre        {case['ids']}")
            back = tok.decode(ids, skip_special_tokens=False)
            if back != case["text"]:
                sys.exit(f"round-trip mismatch: {case['text']!r} -> {back!r}")
    print(f"ok: {len(cases)} texts encode identically and round-trip")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
