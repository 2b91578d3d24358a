"""The official anthropic SDK against a real instruct model (SmolLM2-135M-Instruct from its
GGUF file): the answers are right, and the SDK's helpers agree with the plain calls."""

import anthropic
import pytest

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture()
def client(smollm2_server):
    return anthropic.Anthropic(base_url=smollm2_server.url, api_key="sk-local", max_retries=0)


def test_a_fact_through_messages_create_and_the_stream_helper(client):
    m = client.messages.create(model="claude-haiku-4-5", max_tokens=48, extra_body={"temperature": 0}, messages=QUESTION)
    assert "Paris" in m.content[0].text and m.stop_reason == "end_turn", m
    with client.messages.stream(model="claude-haiku-4-5", max_tokens=48, extra_body={"temperature": 0}, messages=QUESTION) as s:
        streamed = "".join(s.text_stream)
        final = s.get_final_message()
    assert streamed == m.content[0].text and final.stop_reason == "end_turn"
    n = client.messages.count_tokens(model="claude-haiku-4-5", messages=QUESTION).input_tokens
    assert n == m.usage.input_tokens + m.usage.cache_read_input_tokens


def test_a_system_prompt_and_a_second_turn(client):
    system = [{"type": "text", "text": "You are a geography teacher. Answer in one sentence.", "cache_control": {"type": "ephemeral"}}]
    first = client.messages.create(model="m", max_tokens=48, system=system, extra_body={"temperature": 0}, messages=QUESTION)
    assert "Paris" in first.content[0].text
    history = QUESTION + [
        {"role": "assistant", "content": first.content[0].text},
        {"role": "user", "content": "And the capital of Italy?"},
    ]
    second = client.messages.create(model="m", max_tokens=48, system=system, extra_body={"temperature": 0}, messages=history)
    assert "Rome" in second.content[0].text, second
    assert second.usage.cache_read_input_tokens > second.usage.input_tokens, second.usage
