"""OpenBLAS's idle threads sleep instead of spinning (``blas.THREAD_TIMEOUT``): measured as the
CPU time a process burns while it sleeps right after a matmul, with the server's setting and
with OpenBLAS's own (whose threads spin for about a tenth of a second)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import os, sys, time
from pensieve_bridge import blas
print(blas.preload("auto"), file=sys.stderr)
import mlx.core as mx
a = mx.random.normal((512, 512))
spent = []
for _ in range(8):
    mx.eval(a @ a)
    before = time.process_time()
    time.sleep(0.05)
    spent.append(time.process_time() - before)
print(max(spent), os.environ["OPENBLAS_THREAD_TIMEOUT"])
"""


def idle_cpu(timeout=None):
    """CPU seconds a process spends in a 50 ms sleep after a matmul (the most of 8: a busy
    machine may leave a spinning thread no core in some of them), and the
    ``OPENBLAS_THREAD_TIMEOUT`` it ran with."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_THREAD_TIMEOUT", "OPENBLAS_NUM_THREADS")}
    if timeout is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = timeout
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    if "OpenBLAS" not in out.stderr and "openblas" not in out.stderr:
        pytest.skip(f"no OpenBLAS here: {out.stderr.strip()}")
    spent, used = out.stdout.split()
    return float(spent), used


def test_idle_openblas_threads_sleep_unless_the_user_says_otherwise():
    spent, used = idle_cpu()
    assert used == "4"
    # OpenBLAS's own setting: its idle threads spin through the sleep (up to 50 ms of CPU with a
    # core free; 35 ms in the worst of four runs beside a build here). The check can fail.
    spinning, used = idle_cpu("28")
    assert used == "28"  # the user's value is kept
    if (os.cpu_count() or 1) > 1:
        assert spinning > max(10 * spent, 0.005), (spent, spinning)
    assert spent < 0.002, (spent, spinning)
