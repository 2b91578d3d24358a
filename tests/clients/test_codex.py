"""Codex CLI itself (`@openai/codex`, pinned, installed by `make codex`) against the real
server: `codex exec` with pensieve as a custom model provider (Responses API), in a throwaway
CODEX_HOME, completes a turn."""

import os
import subprocess

from conftest import ROOT

CODEX = ROOT / ".cache" / "codex" / "node_modules" / ".bin" / "codex"


def test_codex_exec_completes_a_turn_against_pensieve(server, tmp_path):
    assert CODEX.exists(), f"{CODEX} is missing: `make codex` installs it (npm)"
    home = tmp_path / "codex-home"
    home.mkdir()
    (home / "config.toml").write_text(
        'model = "local"\nmodel_provider = "pensieve"\n\n[model_providers.pensieve]\nname = "pensieve"\n'
        f'base_url = "{server.url}/v1"\nwire_api = "responses"\nenv_key = "PENSIEVE_API_KEY"\n'
    )
    out = subprocess.run(
        [str(CODEX), "exec", "--skip-git-repo-check", "say hi [[script]]Hi! I am pensieve's demo model.[[/script]]"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "CODEX_HOME": str(home), "PENSIEVE_API_KEY": "sk-local"},
    )
    assert out.returncode == 0, f"codex exited {out.returncode}\nstdout: {out.stdout}\nstderr: {out.stderr}"
    # The last line of stdout is the agent's final message: the scripted answer, through
    # Codex's own prompt (about 15,000 tokens of instructions and tools) and event parser.
    assert out.stdout.strip().splitlines()[-1] == "Hi! I am pensieve's demo model.", out.stdout
    assert any("/v1/responses" in line and "status=200" in line for line in server.log)
