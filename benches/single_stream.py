"""One stream, from the engine to the socket: pensieve over HTTP against mlx-lm's own
`stream_generate` in this process, on the same model folder with the same BLAS, and the
spread of 200 identical requests.

    make build
    .venv/bin/python benches/single_stream.py [ROUNDS] [REQUESTS]
    PENSIEVE_BIN=/path/to/venv/bin/pensieve .venv/bin/python benches/single_stream.py   # the wheel

1. Alternating rounds (default 15): one in-process `stream_generate` of TOKENS (256) tokens at
   temperature 0, then the same prompt streamed from pensieve (Messages API, SSE read to the
   end by curl). Tokens/s is output tokens over the time from the request to the last token (prefill
   included on both sides); prints the medians and the ratio pensieve / in-process.
2. REQUESTS (default 200) identical non-streamed requests one after another: p50, p99 and the
   maximum latency, and p99 / p50. Each is followed by the same generation in process, and by
   a fixed pure-Python loop of about the same length on one thread: their own p99 / p50 is the
   machine's noise floor over the same minutes (a shared machine's speed moves by a third for
   seconds at a time, and that alone puts p99 at 1.3-1.7x p50, for the loop too).

The server runs with `backend.prompt_lookup_tokens` as configured (default 10): the demo
model's text rarely repeats its prompt, so this is the cost of speculation where it does not
help as well.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import served

ROOT = Path(__file__).resolve().parents[1]
#: The server to measure: the checkout's binary, or PENSIEVE_BIN (the wheel's `pensieve` command
#: in a venv it was installed into, say).
BIN = Path(os.environ.get("PENSIEVE_BIN", ROOT / "target/release/pensieve"))
TOKENS = int(os.environ.get("TOKENS", "256"))
PROMPT = "Tell me about memory."


def over_http(base: str, stream: bool) -> tuple[int, float]:
    """(output tokens, seconds) of one request, sent with curl: a Python client reading an SSE
    stream event by event takes a core's worth of time itself on this 2-core machine (it
    measured half the server's speed), curl does not. The time is curl's own, from connecting
    to the last byte."""
    body = {
        "model": "demo",
        "max_tokens": TOKENS,
        "temperature": 0,
        "stream": stream,
        "messages": [{"role": "user", "content": PROMPT}],
    }
    out = subprocess.run(
        ["curl", "-sN", base + "/v1/messages", "-H", "content-type: application/json", "-d", json.dumps(body),
         "-w", "\n%{time_total}"],
        capture_output=True, text=True, check=True,
    ).stdout
    text, secs = out.rsplit("\n", 1)
    if stream:
        delta = [line for line in text.splitlines() if line.startswith("data: ") and '"message_delta"' in line][-1]
        tokens = json.loads(delta[6:])["usage"]["output_tokens"]
    else:
        tokens = json.loads(text)["usage"]["output_tokens"]
    return tokens, float(secs)


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    requests = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    sys.path.insert(0, str(ROOT / "python_bridge"))
    from pensieve_bridge import blas, demo

    blas.preload("auto")  # as the server does, before MLX is imported
    from mlx_lm import load, stream_generate
    from mlx_lm.sample_utils import make_sampler

    with tempfile.TemporaryDirectory() as tmp:
        folder = demo.build(tmp)
        model, tokenizer = load(str(folder))
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
        proc, base = served.serve([str(BIN), "serve", "--port", "0", "--model", str(folder)], dict(os.environ), ROOT)
        try:
            over_http(base, True)  # warm
            local, remote = [], []
            for r in range(rounds):
                for side in ("local", "http") if r % 2 == 0 else ("http", "local"):
                    if side == "local":
                        t, n = time.perf_counter(), 0
                        for _ in stream_generate(model, tokenizer, prompt, max_tokens=TOKENS, sampler=make_sampler(0.0)):
                            n += 1
                        local.append(n / (time.perf_counter() - t))
                    else:
                        n, secs = over_http(base, True)
                        remote.append(n / secs)
            a, b = statistics.median(remote), statistics.median(local)
            print(f"single stream, {TOKENS} tokens, {rounds} alternating rounds (median tokens/s):")
            print(f"  pensieve over HTTP (SSE) {a:7.1f}   mlx-lm stream_generate in process {b:7.1f}   ratio {a / b:.2f}")
            print(f"  spread: HTTP {min(remote):.0f}-{max(remote):.0f}, in process {min(local):.0f}-{max(local):.0f}")
            latencies, floor, loop = [], [], []
            size = _calibrate(over_http(base, False)[1])
            for _ in range(requests):
                n, secs = over_http(base, False)
                latencies.append(secs)
                t = time.perf_counter()
                for _ in stream_generate(model, tokenizer, prompt, max_tokens=TOKENS, sampler=make_sampler(0.0)):
                    pass
                floor.append(time.perf_counter() - t)
                loop.append(_work(size))
            print(f"{requests} identical requests ({TOKENS} tokens, not streamed), one after another, each followed by")
            print("the same generation in process and a fixed pure-Python loop (the noise floor):")
            for name, xs in (("pensieve", latencies), ("in process", floor), ("loop", loop)):
                xs.sort()
                p50 = statistics.median(xs)
                p99 = xs[min(len(xs) - 1, int(0.99 * len(xs)))]
                print(f"  {name:10s}  p50 {p50 * 1000:.0f} ms   p99 {p99 * 1000:.0f} ms   max {xs[-1] * 1000:.0f} ms   p99/p50 {p99 / p50:.2f}")
                deciles = [xs[int(q * (len(xs) - 1))] * 1000 for q in (0, 0.1, 0.25, 0.5, 0.75, 0.9, 1)]
                print("              min, p10, p25, p50, p75, p90, max: " + ", ".join(f"{d:.0f}" for d in deciles) + " ms")
        finally:
            proc.terminate()
            proc.wait()


def _work(size: int) -> float:
    """Seconds of a fixed pure-Python loop of ``size`` iterations (one thread, no memory to speak of)."""
    t, total = time.perf_counter(), 0
    for i in range(size):
        total += i * i
    return time.perf_counter() - t


def _calibrate(seconds: float) -> int:
    """Iterations of :func:`_work` that take about ``seconds``."""
    size = 100_000
    return max(1, int(size * seconds / min(_work(size) for _ in range(5))))


if __name__ == "__main__":
    main()
