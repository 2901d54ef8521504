"""Shared by the harnesses: the seed corpus from the captured wire corpus."""

from __future__ import annotations

import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIRE = os.path.join(ROOT, "tests", "wire", "qga-7.2.json")


def wire_cases() -> list[dict]:
    with open(WIRE) as f:
        return json.load(f)["cases"]


def client_seeds() -> list[bytes]:
    """What clients wrote to the real agent (small inputs only)."""
    out = []
    for case in wire_cases():
        if "input" in case:
            out.append(case["input"].encode("latin-1"))
        parts = case.get("input_parts")
        if parts:
            out.append("".join(parts).encode("latin-1"))
    out += FOUND
    return [data for data in out if len(data) <= 4096]


# Inputs that once made a harness fail, kept as seeds so every run tries them.
FOUND = [
    # fuzz_requests: a number past a double's range was sent on as "inf".
    b'{"execute": "guest-sync", "arguments": {"id": 184E6744073749561}}615\n',
]


def agent_seeds() -> list[bytes]:
    """What the real agent wrote back, one case's output per seed."""
    out = []
    for case in wire_cases():
        data = "".join(case.get("replies") or []) + "".join(case.get("after_flush") or [])
        data += case.get("flush_reply") or ""
        if data:
            out.append(data.encode("latin-1"))
    return [data for data in out if len(data) <= 16384]


def write_seed_corpus(directory: str, seeds: list[bytes]) -> None:
    os.makedirs(directory, exist_ok=True)
    for i, data in enumerate(seeds):
        path = os.path.join(directory, "wire-%03d" % i)
        if not os.path.exists(path):
            with open(path, "wb") as f:
                f.write(data)
