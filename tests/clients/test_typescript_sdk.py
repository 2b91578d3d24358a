"""The official TypeScript SDK (`@anthropic-ai/sdk`, pinned, installed by `make ts-sdk`) against
the real server: create, stream with finalMessage(), countTokens, a forced tool round trip and
the tool runner with a forced tool (tests/clients/sdk_ts.mjs)."""

import os
import shutil
import subprocess

from conftest import ROOT

SDK_DIR = ROOT / ".cache" / "anthropic-sdk-ts"


def test_the_typescript_sdk(server):
    assert (SDK_DIR / "node_modules/@anthropic-ai/sdk").is_dir(), f"{SDK_DIR} is missing: `make ts-sdk` installs it (npm)"
    node = shutil.which("node")
    assert node, "node is missing (it comes with npm, which `make claude-code` needs too)"
    out = subprocess.run(
        [node, str(ROOT / "tests/clients/sdk_ts.mjs")],
        env={**os.environ, "PENSIEVE_URL": server.url, "SDK_DIR": str(SDK_DIR)},
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, f"stdout: {out.stdout}\nstderr: {out.stderr}"
    assert out.stdout.count("ok: ") == 5, out.stdout
