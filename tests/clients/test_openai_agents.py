"""The OpenAI Agents SDK (openai-agents, pinned in tests/clients/requirements.txt) against the
real server on SmolLM2, on the Responses API and on Chat Completions: an agent with a function
tool, and an agent with an `output_type`."""

import asyncio

import pytest
from agents import (
    Agent,
    ModelSettings,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from conftest import SMOLLM2, Verdict, weather
from openai import AsyncOpenAI

NAME = SMOLLM2.stem
# Traces go to OpenAI's servers otherwise.
set_tracing_disabled(True)
get_weather = function_tool(weather, name_override="get_weather")


def model(server, api):
    client = AsyncOpenAI(base_url=server.url + "/v1", api_key="sk-local", max_retries=0)
    if api == "responses":
        return OpenAIResponsesModel(model=NAME, openai_client=client)
    return OpenAIChatCompletionsModel(model=NAME, openai_client=client)


@pytest.mark.parametrize("api", ["responses", "chat"])
def test_an_agent_calls_its_function_tool(smollm2_server, api):
    agent = Agent(
        name="weather", instructions="You answer questions about the weather.", model=model(smollm2_server, api),
        tools=[get_weather], tool_use_behavior="stop_on_first_tool",
        model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=64),
    )
    result = asyncio.run(Runner.run(agent, "What is the weather in Paris?", max_turns=2))
    assert result.final_output.startswith("18 C and sunny in") and "Paris" in result.final_output, result
    items = result.to_input_list()
    # What goes back on the next turn: the call and its output, no empty message beside them.
    assert [i.get("type") for i in items[1:]] == ["function_call", "function_call_output"], items
    assert items[1]["call_id"].startswith("call_")


@pytest.mark.parametrize("api", ["responses", "chat"])
def test_an_agent_with_an_output_type_gets_it(smollm2_server, api):
    agent = Agent(
        name="judge", instructions="Judge the statement.", model=model(smollm2_server, api), output_type=Verdict,
        model_settings=ModelSettings(temperature=0, max_tokens=80),
    )
    result = asyncio.run(Runner.run(agent, "17 is a prime number.", max_turns=1))
    assert isinstance(result.final_output, Verdict), result
