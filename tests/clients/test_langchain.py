"""LangChain (langchain-openai, pinned in tests/clients/requirements.txt) against the real server
on SmolLM2: `bind_tools` with an `@tool` function (an open schema) and `tool_choice`, and
`with_structured_output` on Chat Completions and on the Responses API, streamed too."""

import pytest
from conftest import SMOLLM2, Verdict, weather
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

NAME = SMOLLM2.stem
get_weather = tool("get_weather")(weather)


def chat(server, responses=False):
    return ChatOpenAI(
        base_url=server.url + "/v1", api_key="sk-local", model=NAME, temperature=0, max_tokens=80,
        max_retries=0, use_responses_api=responses,
    )


@pytest.mark.parametrize("responses", [False, True], ids=["chat", "responses"])
@pytest.mark.parametrize("choice", ["get_weather", "any"])
def test_bind_tools_with_a_forced_choice_gives_one_valid_call(smollm2_server, responses, choice):
    llm = chat(smollm2_server, responses).bind_tools([get_weather], tool_choice=choice)
    msg = llm.invoke("What is the weather in Paris?")
    assert len(msg.tool_calls) == 1, msg
    call = msg.tool_calls[0]
    assert call["name"] == "get_weather" and list(call["args"]) == ["city"], call
    assert "Paris" in call["args"]["city"]
    assert not msg.invalid_tool_calls
    # The round trip: the tool runs, its result goes back, the model answers.
    result = get_weather.invoke(call)
    follow = chat(smollm2_server, responses).bind_tools([get_weather]).invoke(
        ["What is the weather in Paris?", msg, result]
    )
    assert follow.content or follow.tool_calls


@pytest.mark.parametrize("responses", [False, True], ids=["chat", "responses"])
def test_with_structured_output_parses_in_schema_order(smollm2_server, responses):
    structured = chat(smollm2_server, responses).with_structured_output(Verdict, include_raw=True)
    out = structured.invoke("Is 17 a prime number? Think first.")
    assert out["parsing_error"] is None and isinstance(out["parsed"], Verdict), out
    raw = out["raw"]
    text = raw.content if isinstance(raw.content, str) else "".join(p.get("text", "") for p in raw.content)
    assert text.index('"reasoning"') < text.index('"answer"'), text


@pytest.mark.parametrize("responses", [False, True], ids=["chat", "responses"])
def test_streamed_structured_output_ends_parsed(smollm2_server, responses):
    # On the Responses API, langchain-openai decides from `text.format` in `response.completed`
    # whether to parse: the response must repeat the request's format.
    chunks = list(chat(smollm2_server, responses).with_structured_output(Verdict).stream("Is 17 a prime number?"))
    assert chunks and isinstance(chunks[-1], Verdict), chunks
