"""Tool calls read as they are generated (calls.py) and the generic tool format (tool_format.py):
the text cut into every possible piece gives the same call, a cut call keeps what it wrote."""

import json

import pytest
from pensieve_bridge import tool_format
from pensieve_bridge.calls import CallStream, GenericOutput, complete_object, decode_string_part
from pensieve_bridge.protocol import Finish, Piece

CALL = '{"name": "get_weather", "arguments": {"city": "Par\\"is", "days": [1, {"x": "}"}], "ok": true}}'


def pieces_of(reader, text, size):
    out = []
    for i in range(0, len(text), size):
        out.extend(reader.feed(text[i : i + size]))
    return out


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_a_call_streams_its_name_then_its_arguments_whatever_the_pieces(size):
    s = CallStream()
    out = pieces_of(s, CALL, size)
    assert out[0] == (Piece.TOOL_START, "get_weather")
    assert all(kind == Piece.TOOL_ARGS for kind, _ in out[1:])
    args = "".join(p for _, p in out[1:])
    assert json.loads(args) == json.loads(CALL)["arguments"]
    assert s.args_done
    assert s.finish() == (Piece.TOOL, json.dumps(json.loads(CALL), ensure_ascii=False))


def test_arguments_that_are_not_an_object_come_whole_at_the_end():
    s = CallStream()
    out = pieces_of(s, '{"name": "f", "arguments": "{\\"a\\": 1}"}', 1)
    assert out == [(Piece.TOOL_START, "f")]
    assert json.loads(s.finish()[1]) == {"name": "f", "arguments": {}}


@pytest.mark.parametrize(
    "cut, kept",
    [
        ('{"city": "Par', {"city": "Par"}),
        ('{"city": "Paris", "da', {"city": "Paris"}),
        ('{"city": "Paris", "days":', {"city": "Paris"}),
        ('{"city": "Paris", "days": 1', {"city": "Paris", "days": 1}),
        ('{"city": "Paris", "days": [1, 2', {"city": "Paris", "days": [1, 2]}),
        ('{"city": "Paris", "n": {"a": tr', {"city": "Paris", "n": {}}),
        ('{"city": "a\\', {"city": "a"}),
        ('{"city": "\\u00e', {"city": ""}),
        ('{"', {}),
        ("", {}),
    ],
)
def test_a_cut_object_keeps_what_it_wrote(cut, kept):
    assert complete_object(cut) == kept


def test_a_call_cut_anywhere_is_a_call_when_its_name_is_known():
    for end in range(len(CALL)):
        s = CallStream()
        s.feed(CALL[:end])
        call = s.finish(["get_weather", "get_time"])
        if end < len('{"name": "get_w'):
            assert call is None, CALL[:end]
            continue
        kind, payload = call
        assert kind == Piece.TOOL and json.loads(payload)["name"] == "get_weather", CALL[:end]
    s = CallStream()
    s.feed('{"name": "get_')
    assert s.finish(["get_weather"])[0] == Piece.TOOL, "one tool: a cut name is that tool"


def test_a_json_string_decodes_as_it_comes():
    assert decode_string_part('ab\\ncd"rest') == ("ab\ncd", 7, True)
    assert decode_string_part("ab\\u00") == ("ab", 2, False)
    assert decode_string_part("\\ud83d") == ("", 0, False), "half a surrogate pair waits"
    assert decode_string_part("\\ud83d\\ude00!") == ("\U0001f600!", 13, False)


@pytest.mark.parametrize("size", [1, 3, 1000])
def test_the_generic_format_streams_a_reply_as_text_and_a_call_as_a_call(size):
    g = GenericOutput()
    reply = '{"response": "Hello,\\n \\"you\\" \\u00e9"}'
    out = pieces_of(g, reply, size) + g.feed("", Finish.STOP)
    assert all(kind == Piece.TEXT for kind, _ in out)
    assert "".join(p for _, p in out) == 'Hello,\n "you" é'
    assert not g.made_tool_call
    g = GenericOutput()
    out = pieces_of(g, '{"tool_call": ' + CALL + "}", size) + g.feed("", Finish.STOP)
    assert out[0] == (Piece.TOOL_START, "get_weather") and out[-1][0] == Piece.TOOL
    assert json.loads(out[-1][1]) == json.loads(CALL)
    assert g.made_tool_call


def test_tools_are_described_to_a_template_without_them_and_turns_written_in_the_same_words():
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    chat = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": "15 C", "tool_call_id": "call_1"},
        ],
        "tools": tools,
    }
    out = tool_format.rewrite(chat)
    assert "tools" not in out and chat["messages"][2]["tool_calls"], "the chat given is not changed"
    system, user, assistant, result = out["messages"]
    assert system["content"].startswith("Be brief.\n\nYou can call these tools:\n")
    assert '"name": "get_weather"' in system["content"] and '"tool_call"' in system["content"]
    assert assistant["content"] == '{"tool_call":{"name":"get_weather","arguments":{"city":"Paris"}}}', "compact, as generated"
    assert result == {"role": "user", "content": "Result of get_weather: 15 C"}
    chat["messages"].append({"role": "assistant", "content": "It is 15 C."})
    assert tool_format.rewrite(chat)["messages"][-1]["content"] == '{"response":"It is 15 C."}'
    chat["continue_final"] = True
    assert tool_format.rewrite(chat)["messages"][-1]["content"] == "It is 15 C.", "a prefill is left as it is"


def test_the_format_is_told_from_the_template(engine):
    assert engine.tool_format == tool_format.NATIVE, "the demo model's template shows tools"

    class NoParser:
        has_tool_calling = False
        tool_parser = None

    assert tool_format.detect(NoParser(), lambda chat: [1]) == tool_format.GENERIC
    assert tool_format.detect(engine.tokenizer, lambda chat: [1, 2]) == tool_format.GENERIC, "tools not shown"
