"""The wheel, measured: time from `pip install` to the first answer, and the PyPI OpenBLAS
against Debian's on SmolLM2's prefill, side by side.

    make wheel smollm2 && .venv/bin/python benches/wheel.py [ROUNDS]

1. A fresh venv in a temporary folder; `pip install dist/pensieve-*.whl` (dependencies from
   PyPI, through pip's cache: downloads aside, as the issue asks); then from another folder with
   a fresh HOME `pensieve serve --model demo` (which builds the demo model) until the first
   Messages answer. Prints each part's seconds.
2. Two servers from that venv on SmolLM2: one with `backend.blas` left at auto (scipy-openblas32,
   from PyPI), one with `backend.blas` set to Debian's OpenBLAS (libopenblas0-pthread). Each
   round sends both the same new ~1,500-token prompt (max_tokens 1: the time is the prefill),
   alternating which goes first. Prints the medians and their ratio.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import served

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = ROOT / ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
DEBIAN_BLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
BASE_PYTHON = Path(getattr(sys, "_base_executable", sys.executable))


def env_for(home: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PENSIEVE", "VIRTUAL_ENV", "XDG_"))}
    env["HOME"] = str(home)
    env.update(extra)
    return env


def serve(bin_dir: Path, args: list[str], home: Path, cwd: Path, **extra) -> tuple[subprocess.Popen, str]:
    return served.serve([str(bin_dir / "pensieve"), "serve", "--port", "0", *args], env_for(home, **extra), cwd)


def ask(base: str, content: str, max_tokens: int = 1) -> float:
    body = {"model": "m", "max_tokens": max_tokens, "messages": [{"role": "user", "content": content}]}
    req = urllib.request.Request(base + "/v1/messages", json.dumps(body).encode(), {"content-type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as res:
        json.load(res)
    return time.perf_counter() - start


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    wheel = sorted((ROOT / "dist").glob("pensieve-*.whl"))[-1]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        home, cwd = tmp / "home", tmp / "elsewhere"
        home.mkdir()
        cwd.mkdir()
        t0 = time.perf_counter()
        subprocess.run([str(BASE_PYTHON), "-m", "venv", str(tmp / "venv")], check=True)
        subprocess.run([str(tmp / "venv/bin/pip"), "install", "--quiet", str(wheel)], check=True)
        t1 = time.perf_counter()
        proc, base = serve(tmp / "venv/bin", ["--model", "demo"], home, cwd)
        ask(base, "Hello", 8)
        t2 = time.perf_counter()
        proc.terminate()
        proc.wait()
        print(f"install: {t1 - t0:.1f} s (venv + pip install, pip's cache warm)")
        print(f"first answer: {t2 - t1:.1f} s after install (start, demo model built, one answer)")
        print(f"pip install to first answer: {t2 - t0:.1f} s")

        if not Path(DEBIAN_BLAS).exists():
            print(f"prefill: skipped ({DEBIAN_BLAS} missing: `make blas` installs it)")
            return
        servers = {}
        for name, extra in (("pypi", {}), ("debian", {"PENSIEVE_BACKEND__BLAS": DEBIAN_BLAS})):
            servers[name] = serve(tmp / "venv/bin", ["--model", str(SMOLLM2)], home, cwd, **extra)
        times: dict[str, list[float]] = {"pypi": [], "debian": []}
        text = "The quick brown fox jumps over the lazy dog near the river bank. " * 110
        for name in servers:  # warm-up
            ask(servers[name][1], f"warm-up {name}. {text}")
        for r in range(rounds):
            order = ["pypi", "debian"] if r % 2 == 0 else ["debian", "pypi"]
            for name in order:
                times[name].append(ask(servers[name][1], f"Round {r}. {text}"))
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"SmolLM2 prefill of ~1,500 tokens, {rounds} alternating rounds (median s):")
    print(f"  scipy-openblas32 (PyPI): {med['pypi']:.3f}   {[round(t, 3) for t in times['pypi']]}")
    print(f"  Debian OpenBLAS:         {med['debian']:.3f}   {[round(t, 3) for t in times['debian']]}")
    print(f"  ratio PyPI/Debian: {med['pypi'] / med['debian']:.2f} (within 20%: {abs(med['pypi'] / med['debian'] - 1) <= 0.2})")


if __name__ == "__main__":
    main()
