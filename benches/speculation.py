"""Speculative decoding from the prompt (`backend.prompt_lookup_tokens`), on and off, side by
side over HTTP, on an edit-shaped turn (the model writes out a 60-line file from its prompt
with one change: `tests/fixtures/edit-turn.py`), on a free-text turn (nothing to copy: what
speculation costs when its drafts fail), and on the edit as a forced call to a write tool (held
to the call's grammar: its drafts are cut by the grammar, its scaffolding forced).

    make build smollm2
    .venv/bin/python benches/speculation.py [MODEL] [ROUNDS] [TOKENS]

MODEL is `demo` or a path (default: the SmolLM2 GGUF). Each round starts one server per
setting, alternating which goes first, and streams each turn at temperature 0. Decoding time
is from the first text to the end of the stream (the prompt's prefill is not in it). Prints
the medians of decoding tokens/s, the ratio on / off, the acceptance rate and tokens per step
(from /metrics), and whether the texts are byte-identical.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import urllib.request
from pathlib import Path

import served

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / "target/release/pensieve"
SMOLLM2 = ROOT / ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
SETTINGS = {"on (10)": "10", "off (0)": "0"}
FILE = (ROOT / "tests/fixtures/edit-turn.py").read_text()
EDIT = (
    f"Here is a Python file:\n\n```python\n{FILE}```\n\nRewrite this file with one change: "
    "rename the method `hit_rate` to `ratio`. Write out the whole file."
)
WRITE = {
    "name": "write_file",
    "description": "Write a file",
    "input_schema": {
        "type": "object",
        "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
        "required": ["path", "content"],
    },
}
#: Each turn: the message, and what else the request carries. "call" is the edit as a forced
#: call to a write tool (as Claude Code's Write): held to the call's grammar, whose scaffolding
#: is forced (SmolLM2 leaves the arguments empty: there, the scaffolding is all it measures).
TURNS = {
    "edit": (EDIT, {}),
    "free": ("Write a long story about a robot who learns to paint, with many details.", {}),
    "call": (EDIT + " Save it with write_file as cache.py.", {"tools": [WRITE], "tool_choice": {"type": "tool", "name": "write_file"}}),
}


def stream(base: str, turn: tuple, max_tokens: int) -> tuple[str, float, int]:
    """(text or call input, decoding seconds, output tokens) of one streamed turn."""
    content, extra = turn
    body = {
        "model": "m",
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "messages": [{"role": "user", "content": content}],
        **extra,
    }
    req = urllib.request.Request(base + "/v1/messages", json.dumps(body).encode(), {"content-type": "application/json"})
    text, first, tokens = "", None, 0
    with urllib.request.urlopen(req, timeout=900) as res:
        for line in res:
            if not line.startswith(b"data: "):
                continue
            event = json.loads(line[6:])
            if event["type"] == "content_block_delta" and event["delta"].get("type") == "text_delta":
                first = first or time.perf_counter()
                text += event["delta"]["text"]
            elif event["type"] == "content_block_delta" and event["delta"].get("type") == "input_json_delta":
                first = first or time.perf_counter()
                text += event["delta"]["partial_json"]
            elif event["type"] == "content_block_start" and event["content_block"]["type"] == "tool_use":
                first = first or time.perf_counter()
            elif event["type"] == "message_delta":
                tokens = event["usage"]["output_tokens"]
    return text, time.perf_counter() - first, tokens


def metrics(base: str) -> dict:
    out = {}
    with urllib.request.urlopen(base + "/metrics") as res:
        for line in res.read().decode().splitlines():
            for name in ("drafted_tokens", "accepted_tokens", "decode_sequence_steps", "decode_tokens"):
                if line.startswith(f"pensieve_{name}_total") or line.startswith(f"pensieve_speculative_{name}_total"):
                    out[name] = out.get(name, 0) + float(line.rsplit(" ", 1)[1])
    return out


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else str(SMOLLM2)
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 400
    rates = {(t, s): [] for t in TURNS for s in SETTINGS}
    texts = {(t, s): set() for t in TURNS for s in SETTINGS}
    counters = {s: {} for s in SETTINGS}
    for r in range(rounds):
        order = list(SETTINGS) if r % 2 == 0 else list(SETTINGS)[::-1]
        for setting in order:
            env = {
                **os.environ,
                "PENSIEVE_BACKEND__PROMPT_LOOKUP_TOKENS": SETTINGS[setting],
                "PENSIEVE_BACKEND__PROMPT_CACHE_MB": "0",
            }
            proc, base = served.serve([str(BIN), "serve", "--port", "0", "--model", model], env, ROOT)
            try:
                for turn, request in TURNS.items():
                    text, secs, n = stream(base, request, tokens)
                    rates[(turn, setting)].append((n - 1) / secs)
                    texts[(turn, setting)].add(text)
                    print(f"round {r + 1} {setting:8} {turn}: {n} tokens, {(n - 1) / secs:.1f} tokens/s", flush=True)
                for k, v in metrics(base).items():
                    counters[setting][k] = counters[setting].get(k, 0) + v
            finally:
                proc.terminate()
                proc.wait()
    print(f"\n{Path(model).name}, {rounds} rounds, {tokens} tokens, temperature 0; decoding tokens/s (median)")
    on, off = SETTINGS
    for turn in TURNS:
        a, b = statistics.median(rates[(turn, on)]), statistics.median(rates[(turn, off)])
        same = texts[(turn, on)] == texts[(turn, off)] and len(texts[(turn, on)]) == 1
        print(f"  {turn:5} on {a:8.1f}   off {b:8.1f}   ratio {a / b:.2f}   byte-identical: {same}")
    c = counters[on]
    if c.get("drafted_tokens"):
        print(
            f"  with speculation: {c['accepted_tokens'] / c['drafted_tokens']:.0%} of drafted tokens accepted, "
            f"{c['decode_tokens'] / c['decode_sequence_steps']:.2f} tokens per step"
        )


if __name__ == "__main__":
    main()
