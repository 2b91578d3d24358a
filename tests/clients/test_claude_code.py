"""Claude Code itself (`@anthropic-ai/claude-code`, pinned, installed by `make claude-code`)
against the real server on the demo model."""

import json
import os
import subprocess
from pathlib import Path

from conftest import ROOT

CLAUDE = ROOT / ".cache" / "claude-code" / "node_modules" / ".bin" / "claude"


def run_claude(server, tmp_path, prompt):
    assert CLAUDE.exists(), f"{CLAUDE} is missing: `make claude-code` installs it (npm)"
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "ANTHROPIC_BASE_URL": server.url,
        "ANTHROPIC_API_KEY": "sk-local",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    }
    out = subprocess.run(
        [str(CLAUDE), "-p", prompt, "--output-format", "json"],
        cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, f"claude exited {out.returncode}\nstdout: {out.stdout}\nstderr: {out.stderr}"
    return json.loads(out.stdout)


def test_claude_code_print_mode_completes_with_success(server, tmp_path):
    # The demo model's own text rarely ends its turn, so its answer is a scripted reply
    # (the scripted:demo test model): real tokens through the real tokenizer, end of turn at the end.
    result = run_claude(server, tmp_path, "say hi [[script]]Hi! I am pensieve's demo model.[[/script]]")
    assert result["subtype"] == "success", result
    assert result["is_error"] is False
    assert result["result"] == "Hi! I am pensieve's demo model."
    assert result["usage"]["input_tokens"] > 1000  # its system prompt and tool schemas reached us
    requests = [line for line in server.log if "request finished" in line and "/v1/messages" in line]
    assert requests, "no request reached pensieve"


def test_claude_codes_second_session_reads_its_prompt_from_the_cache(server, tmp_path):
    # Two sessions in the same folder: the billing header's values differ (Claude Code sends a
    # new one with every request), the question differs, everything before it is the same.
    first = run_claude(server, tmp_path, "say hi [[script]]Hi.[[/script]]")
    second = run_claude(server, tmp_path, "what is this folder? [[script]]A test folder.[[/script]]")
    assert second["result"] == "A test folder."
    total = second["usage"]["input_tokens"] + second["usage"]["cache_read_input_tokens"]
    assert total > 1000, second["usage"]
    assert second["usage"]["cache_read_input_tokens"] > 0.8 * total, (first["usage"], second["usage"])
