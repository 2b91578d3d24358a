"""What the dashboard costs while nobody has it open: the same short requests against two
servers, `[dashboard] enabled` (the default: the recent-requests recorder runs on every request)
and switched off, in alternating blocks; median latency of each and their ratio.

    make build && .venv/bin/python benches/dashboard_cost.py [REQUESTS_PER_BLOCK] [BLOCKS]
"""

from __future__ import annotations

import http.client
import json
import os
import statistics
import sys
import time
from pathlib import Path

import served

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / "target/release/pensieve"
BODY = json.dumps({"model": "demo", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]})


def main() -> None:
    per_block = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    blocks = int(sys.argv[2]) if len(sys.argv) > 2 else 6
    servers = {}
    for name, enabled in (("dashboard on", "true"), ("dashboard off", "false")):
        env = {**os.environ, "PENSIEVE_DASHBOARD__ENABLED": enabled, "PENSIEVE_BACKEND__PROMPT_CACHE_MB": "0"}
        servers[name] = served.serve([str(BIN), "serve", "--port", "0"], env, ROOT)
    times: dict[str, list[float]] = {name: [] for name in servers}
    try:
        conns = {name: http.client.HTTPConnection(base.removeprefix("http://")) for name, (_, base) in servers.items()}
        for b in range(blocks + 1):
            order = list(servers) if b % 2 == 0 else list(reversed(servers))
            for name in order:
                for _ in range(per_block):
                    start = time.perf_counter()
                    conns[name].request("POST", "/v1/messages", BODY, {"content-type": "application/json"})
                    res = conns[name].getresponse()
                    res.read()
                    assert res.status == 200, res.status
                    if b > 0:  # the first block warms up
                        times[name].append(time.perf_counter() - start)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait()
    med = {name: statistics.median(v) * 1000 for name, v in times.items()}
    for name, v in med.items():
        print(f"{name:14s} median {v:.2f} ms over {len(times[name])} requests")
    print(f"ratio on/off: {med['dashboard on'] / med['dashboard off']:.3f}")


if __name__ == "__main__":
    main()
