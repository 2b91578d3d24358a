"""The demo model is the same everywhere, loads in mlx-lm and behaves as DESIGN.md says."""

import json

from mlx_lm import load, stream_generate
from pensieve_bridge import demo

# sha256 of the folder that `python -m pensieve_bridge.demo` writes with the pinned packages.
# If this changes, every machine's demo model changes with it: bump demo.VERSION too.
EXPECTED_DIGEST = "44c68b091547fe565d452e283b0840298e04de0bb58dcf14312000119e881fb7"


def test_two_builds_are_bit_identical(tmp_path):
    a = demo.build(tmp_path / "a")
    b = demo.build(tmp_path / "b")
    assert demo.digest(a) == demo.digest(b)


def test_build_matches_the_pinned_digest(tmp_path):
    assert demo.digest(demo.build(tmp_path / "m")) == EXPECTED_DIGEST


def test_every_token_decodes_to_ascii_on_its_own(engine):
    tok = engine.tokenizer
    vocab = tok.get_vocab()
    special = set(demo.SPECIAL_TOKENS)
    for text, i in vocab.items():
        if text in special:
            continue
        s = tok.decode([i])
        assert s.isascii() and s != "", (i, text, s)


def test_tokens_carry_three_to_four_characters_of_english_and_code(engine):
    sample = (
        "The server refuses new requests when the memory available on the machine falls "
        "below the critical threshold, and tells the client when to try again.\n"
        "def handle(self, request):\n    if request.path == '/health':\n"
        "        return self.health()\n    return self.model.generate(request)\n"
    )
    ratio = len(sample) / len(engine.tokenizer.encode(sample))
    assert 2.8 <= ratio <= 5.0, ratio


def test_context_is_at_least_131072_tokens(engine):
    assert engine.context_length >= 131072


def test_chat_template_renders_tools_and_tool_results(engine):
    chat = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"id": "t1", "type": "function",
                     "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
                ],
            },
            {"role": "tool", "tool_call_id": "t1", "content": "rain"},
        ],
        "tools": [
            {"type": "function", "function": {"name": "get_weather", "description": "d",
                                              "parameters": {"type": "object"}}}
        ],
    }
    text = engine.tokenizer.decode(engine.render(json.dumps(chat)))
    assert '"name": "get_weather"' in text
    assert "<tool_call>" in text and "<tool_response>\nrain\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")
    # mlx-lm picks its own tool parser for this template.
    assert engine.tokenizer.tool_parser is not None


def test_demo_folder_loads_in_mlx_lm_directly(tmp_path):
    model, tok = load(str(demo.build(tmp_path / "m")))
    out = "".join(r.text for r in stream_generate(model, tok, "hello", max_tokens=8))
    assert out


def test_state_kinds_have_folders_of_their_own(monkeypatch, tmp_path):
    from pensieve_bridge import disk_cache, paths

    monkeypatch.setattr(paths, "_configured", None)
    monkeypatch.setenv("PENSIEVE_CACHE_DIR", str(tmp_path))
    assert demo.cache_dir() == tmp_path / "models" / f"demo-v{demo.VERSION}"
    assert disk_cache.default_root() == tmp_path / "prompt-cache"
    # The server's resolved folder wins over the environment.
    paths.configure(tmp_path / "server")
    assert demo.cache_dir().parent == tmp_path / "server" / "models"


def test_ensure_puts_the_model_in_place_over_a_stale_folder_and_beside_a_finished_build(monkeypatch, tmp_path):
    from pensieve_bridge import paths

    monkeypatch.setattr(paths, "_configured", tmp_path)
    target = demo.cache_dir()
    # What an interrupted build, or an older layout's prompt cache, left in the way.
    (target / "prompt-cache" / "abc").mkdir(parents=True)
    (target / "prompt-cache" / "abc" / "entry").write_bytes(b"x")
    assert demo.ensure() == target
    assert demo.digest(target) == demo.digest(demo.build(tmp_path / "fresh"))
    # Another process finished first: its folder stays, nothing of this build is left.
    assert demo.ensure() == target
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]
