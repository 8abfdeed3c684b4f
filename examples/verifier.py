#!/usr/bin/env python3
"""A `command` reward verifier for sobre: one JSON line in per completion, one JSON line out.

    [[reward]]
    name = "command"
    command = ["python3", "examples/verifier.py"]
    components = ["correct", "short"]

Each request holds the sample's fields (`prompt`, `answer`, ...) and `completion`.
"""
import json, re, sys

for line in sys.stdin:
    req = json.loads(line)
    text = req.get("completion", "")
    found = re.findall(r"<answer>(.*?)</answer>", text, re.S)
    given = found[-1].strip() if found else ""
    correct = 1.0 if given and given == str(req.get("answer", "")).strip() else 0.0
    short = 0.1 if len(text) < 200 else 0.0
    print(json.dumps({"rewards": {"correct": correct, "short": short}}), flush=True)
