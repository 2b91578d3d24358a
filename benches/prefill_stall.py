"""A long prompt arriving while a stream decodes: the stream's inter-token gaps during that
prompt's prefill, against its gaps before, and the prompt's own time to first token, with the
step budget (`backend.max_decode_stall_ms`, default 500) and without it (0: full 2,048-token
chunks, as mlx-lm's BatchGenerator does), side by side.

    make build smollm2
    .venv/bin/python benches/prefill_stall.py [MODEL] [PROMPT_WORDS] [ROUNDS]

MODEL is `demo` (default) or a path (the SmolLM2 GGUF); PROMPT_WORDS 3,000 (~6,500 tokens
of the demo model; 2,100 words are ~6,100 of SmolLM2).
Each round starts one server per setting (alternating which goes first; prompt lookup off, so
that drafts do not make the stream's tokens come in bursts), starts a stream at temperature 0
that runs to its max_tokens, takes the median of its first ALONE gaps (default 300; "alone")
and their own longest (the machine's noise over as many gaps as the demo model's prompt
takes), then sends the long prompt (streamed) and records every gap between the running stream's tokens from the
moment the long prompt is sent until its first token arrives. Prints p50/p99/max gap, max
against the gap alone, and the long prompt's TTFT per setting (medians over rounds); each
round also says where its three longest gaps fall, counted back from the long prompt's first
token (1: the gap that ends with it).
SETTINGS="name=ms,name=ms" chooses the settings (the last is the one the others are compared
to). AFTER=N (default 0) lets the long prompt decode N tokens beside the stream, and prints the
stream's p50 and longest gap meanwhile (the batch of two at the long prompt's context, whose
caches grow every 256 tokens).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import served

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / "target/release/pensieve"
AFTER = int(os.environ.get("AFTER", "0"))
#: Gaps the stream decodes alone before the long prompt is sent, counted after its first SKIP.
ALONE = int(os.environ.get("ALONE", "300"))
#: The stream's first gaps, left out of its gap alone (its start, at the shortest context).
SKIP = 10
SETTINGS = dict(s.split("=") for s in os.environ.get("SETTINGS", "budget 500 ms=500,no budget=0").split(","))


def start(model: str, stall: str) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PENSIEVE_BACKEND__MAX_DECODE_STALL_MS": stall, "PENSIEVE_BACKEND__PROMPT_CACHE_MB": "0",
           # Drafts would make the running stream's tokens come in bursts; this measures the budget.
           "PENSIEVE_BACKEND__PROMPT_LOOKUP_TOKENS": "0"}
    return served.serve([str(BIN), "serve", "--port", "0", "--model", model], env, ROOT)


def stream(base: str, content: str, max_tokens: int, temperature: float):
    body = {
        "model": "m",
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
        "messages": [{"role": "user", "content": content}],
    }
    req = urllib.request.Request(base + "/v1/messages", json.dumps(body).encode(), {"content-type": "application/json"})
    return urllib.request.urlopen(req, timeout=900)


def one_round(model: str, stall: str, prompt_words: int) -> tuple[list[float], float, bool]:
    proc, base = start(model, stall)
    try:
        stamps: list[float] = []
        stop = threading.Event()

        def run():
            with stream(base, "Write the word hello 3000 times.", 4000, 0.0) as res:
                for line in res:
                    if line.startswith(b"data:") and b"content_block_delta" in line:
                        stamps.append(time.perf_counter())
                    if stop.is_set():
                        return

        t = threading.Thread(target=run, daemon=True)
        t.start()
        while len(stamps) < SKIP + ALONE + 1:  # its gap alone, and how far noise alone takes it
            if not t.is_alive():
                raise SystemExit(f"the running stream ended after {len(stamps)} tokens, before the long prompt was sent")
            time.sleep(0.01)
        words = " ".join(f"w{i % 97}" for i in range(prompt_words))
        sent = time.perf_counter()
        with stream(base, f"Summarise: {words}", 1 + AFTER, 0.0) as res:
            for line in res:
                if line.startswith(b"data:") and (b"content_block" in line or b"message_delta" in line):
                    break
            first = time.perf_counter()
            running_still = t.is_alive()
            for line in res if AFTER else ():
                if line.startswith(b"data:") and b"message_stop" in line:
                    break
            end = time.perf_counter()
        stop.set()
        beside = [s for s in stamps if first <= s <= end]
        after = [b - a for a, b in zip(beside, beside[1:])] if AFTER and t.is_alive() else []
        window = [s for s in stamps if s >= sent]
        before = [s for s in stamps if s < sent]
        points = ([before[-1]] if before else [sent]) + window + ([first] if running_still else [])
        gaps = [b - a for a, b in zip(points, points[1:])]
        alone = [b - a for a, b in zip(before[SKIP:], before[SKIP + 1 :])]
        return gaps, first - sent, running_still, (statistics.median(alone), max(alone)), after
    finally:
        proc.terminate()
        proc.wait()


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else "demo"
    prompt_words = int(sys.argv[2]) if len(sys.argv) > 2 else 3000  # ~6,000 tokens
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    results = {
        name: {"p50": [], "p99": [], "max": [], "ttft": [], "alone": [], "alone_max": [], "covered": 0, "after": []}
        for name in SETTINGS
    }
    for r in range(rounds):
        order = list(SETTINGS) if r % 2 == 0 else list(reversed(SETTINGS))
        for name in order:
            gaps, ttft, covered, (alone, alone_max), after = one_round(model, SETTINGS[name], prompt_words)
            res = results[name]
            if after:
                res["after"].append((statistics.median(after), max(after)))
                print(f"round {r} {name}: beside the long prompt decoding, {len(after)} gaps: p50 "
                      f"{statistics.median(after) * 1000:.1f} ms, max {max(after) * 1000:.1f} ms", flush=True)
            res["alone"].append(alone)
            res["alone_max"].append(alone_max / alone)
            res["p50"].append(statistics.median(gaps))
            res["p99"].append(pct(gaps, 0.99))
            res["max"].append(max(gaps))
            res["ttft"].append(ttft)
            res["covered"] += covered
            # Where the longest gaps fall: gaps counted from the long prompt's first token back
            # (1: the last gap, which ends with that token; n: the first, from the prompt's arrival).
            longest = sorted(range(len(gaps)), key=lambda i: -gaps[i])[:3]
            where = ", ".join(f"{gaps[i] * 1000:.1f} ms at {len(gaps) - i}" for i in longest)
            print(f"round {r} {name}: alone p50 {alone * 1000:.2f} ms, its longest {alone_max / alone:.1f}x; max gap {max(gaps):.3f} s, p50 {statistics.median(gaps):.4f} s, TTFT {ttft:.1f} s, "
                  f"{len(gaps)} gaps, stream ran through: {covered}; longest (gaps before the first token): {where}",
                  flush=True)
    print(f"\n{model}, a {prompt_words}-word prompt arriving while a stream decodes ({rounds} rounds, medians):")
    for name, res in results.items():
        med = {k: statistics.median(v) for k, v in res.items() if k not in ("covered", "after")}
        print(f"  {name:14s} gap alone {med['alone'] * 1000:.1f} ms, while the prompt is read: p50 {med['p50']:.3f} s  "
              f"p99 {med['p99']:.3f} s  max {med['max']:.3f} s ({med['max'] / med['alone']:.0f}x alone)   "
              f"long prompt TTFT {med['ttft']:.2f} s   (stream ran through {res['covered']}/{rounds})")
        print(f"  {'':14s} p50 {med['p50'] / med['alone']:.1f}x alone, p99 {med['p99'] / med['alone']:.1f}x; "
              f"alone, its own longest gap over {ALONE} gaps: {med['alone_max']:.1f}x its median (the noise)")
        if res["after"]:
            p50, longest = (statistics.median(x) for x in zip(*res["after"]))
            print(f"  {'':14s} then beside it decoding: p50 {p50 * 1000:.1f} ms, max {longest * 1000:.1f} ms ({longest / p50:.1f}x p50)")
    last = list(SETTINGS)[-1]
    for name in list(SETTINGS)[:-1]:
        a, b = (statistics.median(results[n]["max"]) for n in (name, last))
        ta, tb = (statistics.median(results[n]["ttft"]) for n in (name, last))
        print(f"  {name} / {last}: max gap {a / b:.2f}, TTFT {ta / tb:.2f}")


if __name__ == "__main__":
    main()
