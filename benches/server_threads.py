"""Where the server's CPU goes, thread by thread, while one stream decodes: CPU microseconds
per output token of each of the server's threads (from /proc), over REQUESTS streamed
requests of 256 tokens on the demo model, one after another, read by curl.

    make build
    .venv/bin/python benches/server_threads.py [REQUESTS]

Threads that MLX and OpenBLAS start from the batch thread carry its name (pensieve-mlx); each
is listed by name and id. Linux only.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import served

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / "target/release/pensieve"
TOKENS = 256


def cpu_by_thread(pid: int) -> collections.Counter:
    """CPU seconds (user and system) of each of ``pid``'s threads, keyed ``name-tid``."""
    out: collections.Counter = collections.Counter()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            raw = open(f"/proc/{pid}/task/{tid}/stat").read()
        except FileNotFoundError:
            continue  # ended meanwhile
        name = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw.rsplit(")", 1)[1].split()
        out[f"{name}-{tid}"] += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def main() -> None:
    requests = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    sys.path.insert(0, str(ROOT / "python_bridge"))
    from pensieve_bridge import demo

    with tempfile.TemporaryDirectory() as tmp:
        folder = demo.build(tmp)
        proc, base = served.serve([str(BIN), "serve", "--port", "0", "--model", str(folder)], dict(os.environ), ROOT)
        body = json.dumps({"model": "demo", "max_tokens": TOKENS, "temperature": 0, "stream": True,
                           "messages": [{"role": "user", "content": "Tell me about memory."}]})
        curl = ["curl", "-sN", base + "/v1/messages", "-H", "content-type: application/json", "-d", body]
        try:
            subprocess.run(curl, capture_output=True, check=True)  # warm
            before, started = cpu_by_thread(proc.pid), time.perf_counter()
            for _ in range(requests):
                subprocess.run(curl, capture_output=True, check=True)
            wall, after = time.perf_counter() - started, cpu_by_thread(proc.pid)
        finally:
            proc.terminate()
            proc.wait()
    tokens = requests * TOKENS
    print(f"{requests} streams of {TOKENS} tokens: {tokens / wall:.0f} tokens/s; CPU per token by thread:")
    for name in sorted(after, key=lambda k: before[k] - after[k]):
        spent = after[name] - before[name]
        if spent > 0:
            print(f"  {name:24s} {spent / tokens * 1e6:6.0f} us")
    total = sum(after.values()) - sum(before.values())
    print(f"  {'all':24s} {total / tokens * 1e6:6.0f} us ({total / wall:.2f} cores)")


if __name__ == "__main__":
    main()
