"""Block splitting and tool-call parsing with mlx-lm's own state machine and parsers, fed
model-shaped output: the demo tokenizer's Hermes/JSON format, and Qwen3-Coder's XML format."""

import json
from types import SimpleNamespace

from mlx_lm.tool_parsers import json_tools, qwen3_coder
from pensieve_bridge.protocol import Piece
from pensieve_bridge.response import ResponseSplitter

WEATHER = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]


def fake_tokenizer(parser):
    """The tokenizer attributes the splitter reads, for a model family we do not ship."""
    return SimpleNamespace(
        tool_parser=parser.parse_tool_call, tool_call_start=parser.tool_call_start,
        tool_call_end=parser.tool_call_end, has_tool_calling=True, has_thinking=True,
        think_start="<think>", think_end="</think>", structural_markers=None,
        response_transitions={}, response_initial_state=None,
    )


def feed_in_chunks(splitter, text, size, finish="stop"):
    out = []
    for i in range(0, len(text), size):
        out += splitter.feed(text[i:i + size])
    out += splitter.feed("", finish)
    # Join text pieces cut by chunking, as a client concatenating deltas would.
    merged = []
    for kind, payload in out:
        if merged and kind != Piece.TOOL and merged[-1][0] == kind:
            merged[-1] = (kind, merged[-1][1] + payload)
        else:
            merged.append((kind, payload))
    return merged


def test_thinking_text_and_a_json_tool_call_in_any_chunking():
    text = ('<think>\nThe user wants weather.\n</think>\n\nLet me check.'
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}\n</tool_call>')
    for size in (1, 2, 3, 7, 1000):
        s = ResponseSplitter(fake_tokenizer(json_tools), WEATHER)
        out = feed_in_chunks(s, text, size)
        assert out == [
            (Piece.THINKING, "The user wants weather.\n"),
            (Piece.TEXT, "Let me check."),
            # The call streams (its name, then its arguments as written), then comes whole.
            (Piece.TOOL_START, "get_weather"),
            (Piece.TOOL_ARGS, '{"city": "Oslo", "days": 2}'),
            (Piece.TOOL, json.dumps({"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}})),
        ], (size, out)
        assert s.made_tool_call


def test_a_json_call_cut_by_max_tokens_is_still_a_call():
    s = ResponseSplitter(fake_tokenizer(json_tools), WEATHER)
    out = feed_in_chunks(s, 'Sure.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Os', 3, finish="length")
    assert out[-1] == (Piece.TOOL, json.dumps({"name": "get_weather", "arguments": {"city": "Os"}}))
    assert [k for k, _ in out] == [Piece.TEXT, Piece.TOOL_START, Piece.TOOL_ARGS, Piece.TOOL]


def test_qwen3_coder_xml_calls_are_parsed_with_the_schema_types():
    text = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n"
            "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"
            "<tool_call>\n<function=get_weather>\n<parameter=city>\nBergen\n</parameter>\n</function>\n</tool_call>")
    s = ResponseSplitter(fake_tokenizer(qwen3_coder), WEATHER)
    out = feed_in_chunks(s, text, 4)
    calls = [json.loads(p) for k, p in out if k == Piece.TOOL]
    assert calls == [{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3}},
                     {"name": "get_weather", "arguments": {"city": "Bergen"}}]


def test_an_unparseable_call_comes_back_as_text_not_lost():
    s = ResponseSplitter(fake_tokenizer(json_tools), WEATHER)
    out = feed_in_chunks(s, "ok <tool_call>{not json</tool_call>", 3)
    assert "".join(p for k, p in out if k == Piece.TEXT) == "ok <tool_call>{not json</tool_call>"
    assert not s.made_tool_call


def test_a_call_cut_by_max_tokens_is_not_dropped():
    s = ResponseSplitter(fake_tokenizer(json_tools), WEATHER)
    out = feed_in_chunks(s, '<tool_call>{"name": "get_weather", "argu', 5, finish="length")
    assert out and out[-1][0] == Piece.TEXT and "get_weather" in out[-1][1]


def test_the_demo_tokenizer_gets_mlx_lms_json_parser_and_think_markers(engine):
    t = engine.tokenizer
    assert t.tool_parser is json_tools.parse_tool_call
    assert t.has_thinking and t.think_start == "<think>"


def test_a_scripted_reply_replays_through_the_real_tokenizer():
    from conftest import add, running
    from pensieve_bridge import engine as engine_mod
    from pensieve_bridge.batch import open_batcher
    from pensieve_bridge.protocol import Finish

    eng = engine_mod.Engine("scripted:demo")
    reply = '<think>hmm</think>Calling.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    chat = {"messages": [{"role": "user", "content": f"[[script]]{reply}[[/script]]"}], "tools": WEATHER}
    b = open_batcher(eng, 4, 0)
    uid, n, _ = add(b, json.dumps(chat), json.dumps({"max_tokens": 200, "temperature": 0}))
    assert n > 10
    items = []
    while running(b):
        items += [(pieces, finish) for _, pieces, finish in b.step()]
    pieces = [p for ps, _ in items for p in ps]
    assert items[-1][1] == Finish.TOOL_USE
    assert (Piece.TOOL, json.dumps({"name": "get_weather", "arguments": {"city": "Oslo"}})) in pieces
    assert "".join(p for k, p in pieces if k == Piece.THINKING) == "hmm"
    assert "".join(p for k, p in pieces if k == Piece.TEXT) == "Calling."
    eng.clear_cache()


def test_a_text_block_before_a_tool_call_keeps_no_trailing_newline_even_when_streamed(engine):
    from pensieve_bridge.response import ResponseSplitter

    tok = engine.tokenizer
    reply = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    ids = tok.encode(reply, add_special_tokens=False)
    detok = tok.detokenizer
    detok.reset()
    splitter = ResponseSplitter(tok, WEATHER)
    pieces = []
    for i, t in enumerate(ids):  # one token at a time, as a stream
        detok.add_token(t)
        last = i == len(ids) - 1
        if last:
            detok.finalize()
        pieces += splitter.feed(detok.last_segment, 0 if last else None)
    assert "".join(p for k, p in pieces if k == Piece.TEXT) == "Let me check."
    assert pieces[-1][0] == Piece.TOOL
    # Whitespace between words, and at the very end without a call, is kept.
    splitter = ResponseSplitter(tok, WEATHER)
    out = splitter.feed("Hello ") + splitter.feed("world.\n") + splitter.feed("", 0)
    assert "".join(p for _, p in out) == "Hello world.\n"
