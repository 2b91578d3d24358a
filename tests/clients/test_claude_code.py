"""Claude Code itself (`@anthropic-ai/claude-code`, pinned, installed by `make claude-code`)
against the real server on the demo model."""

import json
import os
import re
import subprocess
import urllib.request

from conftest import ROOT, SCRIPTED, Server

CLAUDE = ROOT / ".cache" / "claude-code" / "node_modules" / ".bin" / "claude"


def health(server):
    return json.load(urllib.request.urlopen(server.url + "/health"))


def run_claude(server, tmp_path, prompt, **more_env):
    assert CLAUDE.exists(), f"{CLAUDE} is missing: `make claude-code` installs it (npm)"
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "ANTHROPIC_BASE_URL": server.url,
        "ANTHROPIC_API_KEY": "sk-local",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        **more_env,
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


def test_after_a_restart_claude_codes_next_session_reads_its_prompt_from_disk(tmp_path):
    # The prompt cache's disk tier, with Claude Code itself: a session, a stop (the prompt cache
    # goes to disk), a new server on the same folder, the next session.
    env = {"PENSIEVE_BACKEND__MODEL": SCRIPTED, "PENSIEVE_BACKEND__PROMPT_CACHE_DIR": str(tmp_path / "cache")}
    first_server = Server(env)
    try:
        run_claude(first_server, tmp_path, "say hi [[script]]Hi.[[/script]]")
    finally:
        first_server.stop()
    assert list((tmp_path / "cache").rglob("*.safetensors")), "the stop wrote nothing"
    s = Server(env)
    try:
        second = run_claude(s, tmp_path, "what is this folder? [[script]]A test folder.[[/script]]")
        disk = health(s)["backend"]["prompt_cache_disk"]
    finally:
        s.stop()
    assert second["result"] == "A test folder."
    total = second["usage"]["input_tokens"] + second["usage"]["cache_read_input_tokens"]
    assert second["usage"]["cache_read_input_tokens"] > 0.8 * total, second["usage"]
    assert disk["hits"] >= 1 and disk["hit_tokens"] > 0.8 * total, disk


# The main model's reply: a call to Claude Code's Agent tool asking for a subagent on the Haiku
# slot. The subagent's prompt carries the main model's next reply, JSON-escaped so that it is not
# a script of this turn: Claude Code sends the call back in the next request, where it is the
# last script of the prompt.
AGENT_CALL = (
    '<tool_call>\n{"name": "Agent", "arguments": {"description": "Say hello", '
    '"prompt": "Say hello. \\u005b\\u005bscript]]Done.\\u005b\\u005b/script]]", '
    '"subagent_type": "general-purpose", "model": "haiku", "run_in_background": false}}\n</tool_call>'
)


def test_claude_codes_two_slots_are_served_by_the_two_models_they_are_mapped_to(two_model_server, tmp_path):
    s = two_model_server
    before = {m["name"]: m for m in health(s)["backend"]["models"]}
    assert before["main"]["loaded"] and not before["small"]["loaded"], before
    result = run_claude(
        s, tmp_path, f"ask a helper [[script]]{AGENT_CALL}[[/script]]",
        ANTHROPIC_MODEL="main", ANTHROPIC_DEFAULT_HAIKU_MODEL="small", ANTHROPIC_SMALL_FAST_MODEL="small",
        # The demo model writes until the limit under Claude Code's agent prompt: keep the subagent short.
        # The main model's scripted call is 123 tokens.
        CLAUDE_CODE_MAX_OUTPUT_TOKENS="150",
    )
    assert result["subtype"] == "success", result
    assert result["result"] == "Done."
    assert set(result["modelUsage"]) == {"main", "small"}, result["modelUsage"]
    after = {m["name"]: m for m in health(s)["backend"]["models"]}
    print({n: (m["generations"], m["loads"]) for n, m in after.items()})
    # Each slot reached its model (fallback = "404": any other name would have been refused).
    assert after["main"]["generations"] >= before["main"]["generations"] + 2, after
    assert after["small"]["generations"] >= 1 and after["small"]["loads"] == 1, after
    metrics = urllib.request.urlopen(s.url + "/metrics").read().decode()
    assert re.search(r'^pensieve_model_generations_total\{model="small"\} [1-9]', metrics, re.M), metrics
