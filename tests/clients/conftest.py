"""Starts the real release binary on the real demo model for the client tests."""

import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
from pydantic import BaseModel, Field

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / "target" / "release" / "pensieve"


class Server:
    def __init__(self, env=None, prefix=()):
        """``prefix``: a command the server is started through (``sh -c '... exec "$@"'``)."""
        if not BIN.exists():
            raise RuntimeError(f"{BIN} is missing: run `make build`")
        # The prompt cache's disk tier: the server's own, so that no test reads another's.
        self.cache_dir = tempfile.TemporaryDirectory(prefix="pensieve-test-cache-")
        self.proc = subprocess.Popen(
            [*prefix, str(BIN), "serve", "--port", "0"], cwd=ROOT, stderr=subprocess.PIPE, text=True,
            env={
                **os.environ,
                "PENSIEVE_LOG__LEVEL": "info",
                "PENSIEVE_BACKEND__PROMPT_CACHE_DIR": self.cache_dir.name,
                **(env or {}),
            },
        )
        self.log = []
        for line in self.proc.stderr:
            self.log.append(line)
            m = re.search(r"pensieve is serving.*127\.0\.0\.1:(\d+)", line)
            if m:
                self.url = f"http://127.0.0.1:{m.group(1)}"
                break
        else:
            raise RuntimeError("pensieve did not start:\n" + "".join(self.log))
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
        for line in self.proc.stderr:
            self.log.append(line)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.cache_dir.cleanup()


SCRIPTED = "scripted:demo"


@pytest.fixture(scope="session")
def server():
    # The test-only model id: the demo model behind the bridge's scripted test batcher
    # ([[script]] replies, PLEASE-FAIL faults; see pensieve_bridge/testing.py).
    s = Server({"PENSIEVE_BACKEND__MODEL": SCRIPTED})
    yield s
    s.stop()


@pytest.fixture(scope="session")
def keyed_server():
    s = Server({"PENSIEVE_SERVER__API_KEYS": '["sk-local"]'})
    yield s
    s.stop()


SMOLLM2 = ROOT / ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_server():
    """SmolLM2-135M-Instruct, a real instruct model, served from its GGUF file (`make smollm2`)."""
    assert SMOLLM2.exists(), f"{SMOLLM2} is missing: run `make smollm2`"
    s = Server({"PENSIEVE_BACKEND__MODEL": str(SMOLLM2)})
    yield s
    s.stop()


@pytest.fixture(scope="session")
def two_model_server():
    """Two models: `main`, the scripted demo model (Claude Code's main slot), and `small`, the
    plain demo model (its Haiku slot), loaded on its first request. Not SmolLM2: Claude Code's
    subagent sends its tools, which SmolLM2's generic tool format describes in the prompt, and
    that is longer than SmolLM2's 8,192-token context (a 400 that Claude Code's main agent
    would shrug off)."""
    s = Server({
        "PENSIEVE_SERVER__DEFAULT_MODEL": "main",
        "PENSIEVE_SERVER__FALLBACK": "404",
        "PENSIEVE_MODELS__MAIN__PATH": SCRIPTED,
        "PENSIEVE_MODELS__SMALL__PATH": "demo",
    })
    yield s
    s.stop()


def run_node(script: str, package: Path, make: str, env: dict, timeout: int = 300) -> str:
    """Runs ``tests/clients/<script>`` with node against a server (``env`` says where), with the
    npm packages installed in ``package`` (by ``make <make>``); its stdout, once it exits 0."""
    assert package.is_dir(), f"{package} is missing: `make {make}` installs it (npm)"
    node = shutil.which("node")
    assert node, "node is missing (it comes with npm, which `make claude-code` needs too)"
    out = subprocess.run(
        [node, str(ROOT / "tests/clients" / script)], env={**os.environ, **env},
        capture_output=True, text=True, timeout=timeout,
    )
    assert out.returncode == 0, f"stdout: {out.stdout}\nstderr: {out.stderr}"
    return out.stdout


def weather(city: str) -> str:
    """Get the current weather in a city."""
    return f"18 C and sunny in {city}"


class Verdict(BaseModel):
    """A judgement, reasoned first (the order a schema keeps)."""

    reasoning: str = Field(max_length=80)
    answer: bool
