"""A `pensieve serve --port 0` the benches start: waits for its "pensieve is serving" line and
returns the process and its base URL (imported by benches/wheel.py and benches/prefill_stall.py,
which run as scripts from this folder)."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time


def serve(command: list[str], env: dict, cwd) -> tuple[subprocess.Popen, str]:
    """Starts `command` (a `pensieve serve --port 0 ...`), and returns once it serves."""
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    while True:
        for line in list(lines):
            if m := re.search(r"pensieve is serving.*127\.0\.0\.1:(\d+)", line):
                return proc, f"http://127.0.0.1:{m.group(1)}"
        if proc.poll() is not None:
            sys.exit("pensieve exited:\n" + "".join(lines))
        time.sleep(0.05)
