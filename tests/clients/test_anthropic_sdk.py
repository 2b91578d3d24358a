"""The official anthropic Python SDK against the real server and the demo model."""

import asyncio

import anthropic
import pytest

TOOLS = [{"name": "get_weather", "description": "Weather for a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture()
def client(server):
    return anthropic.Anthropic(base_url=server.url, api_key="sk-local", max_retries=0)


def test_messages_create(client):
    m = client.messages.create(model="claude-opus-4-6", max_tokens=16, extra_body={"temperature": 0}, messages=HELLO)
    assert m.type == "message" and m.role == "assistant"
    assert m.model == "scripted:demo"
    assert m.content[0].type == "text" and m.content[0].text
    assert m.stop_reason == "max_tokens"
    assert m.usage.output_tokens == 16 and m.usage.input_tokens > 0
    assert m.usage.cache_read_input_tokens == 0 and m.usage.cache_creation_input_tokens == 0


def test_messages_stream_text_and_final_message_agree(client):
    with client.messages.stream(model="x", max_tokens=24, extra_body={"temperature": 0}, messages=HELLO) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and text == final.content[0].text
    assert final.usage.output_tokens == 24
    plain = client.messages.create(model="x", max_tokens=24, extra_body={"temperature": 0}, messages=HELLO)
    assert plain.content[0].text == text


def test_async_client(server):
    async def go():
        c = anthropic.AsyncAnthropic(base_url=server.url, api_key="k", max_retries=0)
        m = await c.messages.create(model="x", max_tokens=8, messages=HELLO)
        async with c.messages.stream(model="x", max_tokens=8, messages=HELLO) as s:
            final = await s.get_final_message()
        await c.close()
        return m, final
    m, final = asyncio.run(go())
    assert m.usage.output_tokens == 8 and final.usage.output_tokens == 8


def test_count_tokens_matches_usage(client):
    system = [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}]
    n = client.messages.count_tokens(model="x", system=system, tools=TOOLS, messages=HELLO).input_tokens
    m = client.messages.create(model="x", max_tokens=2, system=system, tools=TOOLS, messages=HELLO)
    # Usage counts tokens read from the prompt cache apart, as Anthropic's API does.
    assert n == m.usage.input_tokens + m.usage.cache_read_input_tokens


def test_models_list_and_retrieve(client):
    models = list(client.models.list())
    assert [m.id for m in models] == ["scripted:demo"]
    assert client.models.retrieve("claude-opus-4-1").id == "scripted:demo"


def test_beta_messages_with_betas_and_thinking(client):
    m = client.beta.messages.create(
        model="claude-opus-4-6", max_tokens=2048, betas=["interleaved-thinking-2025-05-14", "claude-code-20250219"],
        thinking={"type": "enabled", "budget_tokens": 1024},
        messages=[{"role": "user", "content": "[[script]]<think>Plan it.</think>Done.[[/script]]"}],
    )
    assert [b.type for b in m.content] == ["thinking", "text"]
    assert m.content[0].thinking == "Plan it." and m.content[0].signature
    assert m.content[1].text == "Done."
    assert m.stop_reason == "end_turn"


def test_system_blocks_with_cache_control_and_role_system_messages(client):
    m = client.messages.create(
        model="x", max_tokens=4,
        system=[{"type": "text", "text": "x-anthropic-billing-header: cc_version=1;"},
                {"type": "text", "text": "You are an agent.", "cache_control": {"type": "ephemeral"}}],
        messages=HELLO, extra_body={"metadata": {"user_id": "u1"}},
    )
    assert m.usage.output_tokens == 4


def test_a_scripted_tool_call_reaches_the_sdk_as_tool_use(client):
    reply = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    msgs = [{"role": "user", "content": f"[[script]]{reply}[[/script]]"}]
    m = client.messages.create(model="x", max_tokens=200, tools=TOOLS, messages=msgs)
    assert m.stop_reason == "tool_use"
    call = m.content[-1]
    assert call.type == "tool_use" and call.name == "get_weather" and call.input == {"city": "Oslo"}
    with client.messages.stream(model="x", max_tokens=200, tools=TOOLS, messages=msgs) as s:
        final = s.get_final_message()
    assert final.content[-1].input == {"city": "Oslo"} and final.stop_reason == "tool_use"


def test_a_conversation_with_tool_use_and_tool_result_history(client):
    m = client.messages.create(
        model="x", max_tokens=4, tools=TOOLS, tool_choice={"type": "auto"},
        messages=[
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": [{"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Oslo"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "Rain, 7 C"}]},
        ],
    )
    assert m.usage.output_tokens == 4


def test_stop_sequences(client):
    full = client.messages.create(model="x", max_tokens=30, extra_body={"temperature": 0}, messages=HELLO).content[0].text
    stop = full[len(full) // 2:][:5]
    m = client.messages.create(model="x", max_tokens=30, extra_body={"temperature": 0}, messages=HELLO, stop_sequences=[stop])
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == stop
    assert m.content[0].text == full[:full.index(stop)]


def test_errors_are_the_sdks_typed_exceptions(client, keyed_server, server):
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="x", max_tokens=0, messages=HELLO)
    assert "max_tokens" in e.value.message
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="x", max_tokens=5, messages=HELLO, extra_body={"temperature": 5})
    assert e.value.body["error"]["type"] == "invalid_request_error"
    bad = anthropic.Anthropic(base_url=keyed_server.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        bad.messages.create(model="x", max_tokens=5, messages=HELLO)
    good = anthropic.Anthropic(base_url=keyed_server.url, api_key="sk-local", max_retries=0)
    assert good.messages.create(model="x", max_tokens=2, messages=HELLO).usage.output_tokens == 2
    with pytest.raises(anthropic.InternalServerError) as e:
        client.messages.create(model="x", max_tokens=20, messages=[{"role": "user", "content": "PLEASE-FAIL"}])
    assert "injected fault" in e.value.message
    with pytest.raises(anthropic.NotFoundError):
        client.get("/v1/nothing", cast_to=object)
    # A failure after the stream began surfaces as an APIStatusError from the stream.
    with pytest.raises(anthropic.APIStatusError) as e:
        with client.messages.stream(model="x", max_tokens=20, messages=[{"role": "user", "content": "PLEASE-FAIL"}]) as s:
            for _ in s:
                pass
    assert "injected fault" in str(e.value)


def test_messages_parse_gives_a_validated_object_whatever_the_model_says(client):
    # The demo model's text is random: the constraint alone makes the answer parse.
    from typing import Literal

    from pydantic import BaseModel

    class Verdict(BaseModel):
        verdict: Literal["yes", "no", "unsure"]
        sure: bool

    for i in range(4):
        m = client.messages.parse(model="x", max_tokens=40, output_format=Verdict,
                                  messages=[{"role": "user", "content": f"Is {i} prime?"}])
        assert m.stop_reason == "end_turn"
        assert isinstance(m.parsed_output, Verdict)


def test_tool_runner_with_a_forced_tool_calls_the_function_with_valid_input(client):
    from anthropic import beta_tool

    calls = []
    schema = {"type": "object", "additionalProperties": False, "required": ["zone"],
              "properties": {"zone": {"enum": ["UTC", "CET", "JST"]}}}

    @beta_tool(input_schema=schema)
    def get_time(zone: str) -> str:
        """The time in a zone."""
        calls.append(zone)
        return f"12:00 {zone}"

    runner = client.beta.messages.tool_runner(
        model="x", max_tokens=40, tools=[get_time], max_iterations=3,
        tool_choice={"type": "tool", "name": "get_time"},
        messages=[{"role": "user", "content": "What time is it?"}])
    messages = list(runner)
    assert len(messages) == 3
    assert all(m.stop_reason == "tool_use" for m in messages)
    assert len(calls) >= 2 and set(calls) <= {"UTC", "CET", "JST"}
