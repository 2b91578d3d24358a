"""Tokens/s through pensieve (streaming, demo model, 256 tokens) against mlx-lm's
``stream_generate`` in-process on the same model folder, measured side by side.

Run with ``make bench`` (or ``.venv/bin/python benches/tokens_per_second.py``). The two are
alternated, ROUNDS times each, and the medians and their ratio are printed. Generation rate is
output tokens divided by the time from the first token to the last, so that both sides are
measured the same way (prompt processing excluded); time to first token is printed apart.
"""

import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm import load, stream_generate
from mlx_lm.sample_utils import make_sampler

from pensieve_bridge import demo

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release" / "pensieve"
ROUNDS = int(os.environ.get("ROUNDS", "7"))
TOKENS = 256
MESSAGES = [{"role": "user", "content": "Tell me about memory."}]


def start_server(model_dir):
    proc = subprocess.Popen(
        [str(BIN), "serve", "--port", "0", "--model", str(model_dir)],
        cwd=ROOT, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PENSIEVE_LOG__LEVEL": "warn,pensieve::server=info"},
    )
    for line in proc.stderr:
        m = re.search(r"pensieve is serving.*127\.0\.0\.1:(\d+)", line)
        if m:
            return proc, int(m.group(1))
    raise RuntimeError("pensieve did not start")


def via_server(port):
    body = json.dumps({"model": "demo", "max_tokens": TOKENS, "temperature": 0, "stream": True,
                       "messages": MESSAGES})
    conn = http.client.HTTPConnection("127.0.0.1", port)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/messages", body, {"content-type": "application/json"})
    res = conn.getresponse()
    first = last = None
    out_tokens = 0
    for raw in res:
        line = raw.decode()
        if line.startswith("data: ") and '"content_block_delta"' in line:
            now = time.perf_counter()
            first = first or now
            last = now
        elif line.startswith("data: ") and '"message_delta"' in line:
            out_tokens = json.loads(line[6:])["usage"]["output_tokens"]
    conn.close()
    return out_tokens, first - t0, (out_tokens - 1) / (last - first)


def in_process(model, tokenizer):
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    t0 = time.perf_counter()
    first = last = None
    n = 0
    for r in stream_generate(model, tokenizer, mx.array(prompt), max_tokens=TOKENS,
                             sampler=make_sampler(temp=0.0)):
        now = time.perf_counter()
        first = first or now
        last = now
        n += 1
    mx.clear_cache()
    return n, first - t0, (n - 1) / (last - first)


def main():
    if not BIN.exists():
        sys.exit(f"{BIN} is missing: run `make build` first")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = demo.build(Path(tmp) / "demo")
        model, tokenizer = load(str(model_dir))
        proc, port = start_server(model_dir)
        try:
            via_server(port), in_process(model, tokenizer)  # warm-up
            server, local = [], []
            for _ in range(ROUNDS):
                server.append(via_server(port))
                local.append(in_process(model, tokenizer))
        finally:
            proc.terminate()
            proc.wait()
    med = lambda xs, i: statistics.median(x[i] for x in xs)
    print(f"demo model, {TOKENS} tokens, temperature 0, {ROUNDS} alternating rounds, medians:")
    print(f"  pensieve (HTTP stream):        {med(server, 2):8.0f} tokens/s, first token {med(server, 1) * 1000:6.1f} ms, {med(server, 0):.0f} tokens")
    print(f"  mlx_lm.stream_generate (local):{med(local, 2):8.0f} tokens/s, first token {med(local, 1) * 1000:6.1f} ms, {med(local, 0):.0f} tokens")
    print(f"  ratio pensieve / in-process:   {med(server, 2) / med(local, 2):8.2f}")


if __name__ == "__main__":
    main()
