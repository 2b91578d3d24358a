"""The official openai Python SDK (pinned) against the real server's Chat Completions route."""

import json

import openai
import pytest

HELLO = [{"role": "user", "content": "Hello there"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
           "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                          "properties": {"city": {"enum": ["Oslo", "Rome"]}}}}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="sk-local", max_retries=0)


def test_chat_completion(client):
    r = client.chat.completions.create(model="gpt-4o", messages=HELLO, max_completion_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.model == "scripted:demo"
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content
    assert c.finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_streamed_with_usage_agrees_with_the_plain_answer(client):
    messages = [{"role": "system", "content": "You are a careful assistant who answers briefly. " * 4}, *HELLO]
    stream = client.chat.completions.create(model="x", messages=messages, max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    plain = client.chat.completions.create(model="x", messages=messages, max_tokens=16, temperature=0)
    assert plain.choices[0].message.content == text
    # The same prompt again comes from the prompt cache, and usage says so (a part of prompt_tokens).
    cached = plain.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < plain.usage.prompt_tokens


def test_stop_and_max_tokens(client):
    script = [{"role": "user", "content": "[[script]]one two three END four[[/script]]"}]
    r = client.chat.completions.create(model="x", messages=script, max_tokens=50, stop=["END"])
    assert r.choices[0].message.content == "one two three " and r.choices[0].finish_reason == "stop"


def test_a_scripted_tool_call_and_its_answer(client):
    messages = [{"role": "user", "content": f"weather? [[script]]{CALL}[[/script]]"}]
    r = client.chat.completions.create(model="x", messages=messages, tools=[WEATHER], max_tokens=60)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    [call] = c.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Oslo"}
    messages += [c.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    again = client.chat.completions.create(model="x", messages=messages, tools=[WEATHER], max_tokens=4)
    assert again.choices[0].message.role == "assistant"


def test_forced_tools_and_json_schema_hold_on_a_random_model(client):
    for i in range(3):
        r = client.chat.completions.create(model="x", messages=[{"role": "user", "content": f"q{i}"}],
                                           tools=[WEATHER], tool_choice="required", max_tokens=40)
        [call] = r.choices[0].message.tool_calls
        assert json.loads(call.function.arguments)["city"] in ("Oslo", "Rome")
    schema = {"type": "object", "additionalProperties": False, "required": ["ok"], "properties": {"ok": {"type": "boolean"}}}
    r = client.chat.completions.create(model="x", messages=HELLO, max_tokens=20,
                                       response_format={"type": "json_schema", "json_schema": {"name": "o", "schema": schema}})
    assert isinstance(json.loads(r.choices[0].message.content)["ok"], bool)


def test_errors_are_the_sdks_typed_exceptions_in_openais_shape(client, keyed_server):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="x", messages=HELLO, n=2)
    assert e.value.body["param"] == "n" and "only 1 choice" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])
    assert e.value.body["param"] == "messages[0].content[0].type"
    # A schema the grammar engine cannot use names the field it came in.
    bad = {"type": "object", "properties": {"a": {"$ref": "#/definitions/missing"}}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="x", messages=HELLO, max_tokens=4, response_format={
            "type": "json_schema", "json_schema": {"name": "o", "schema": bad}})
    assert e.value.body["param"] == "response_format.json_schema.schema", e.value.body
    bad = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model="x", messages=HELLO)
    assert e.value.body["type"] == "authentication_error"
    good = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key="sk-local", max_retries=0)
    assert good.chat.completions.create(model="x", messages=HELLO, max_tokens=2).choices[0].message.role == "assistant"


def test_models_in_a_shape_both_sdks_read(client):
    [m] = list(client.models.list())
    assert m.id == "scripted:demo" and m.object == "model" and m.owned_by == "pensieve"
    assert client.models.retrieve("anything").id == "scripted:demo"


def test_responses_plain_streamed_and_continued(client):
    r = client.responses.create(model="x", input="Hello there", max_output_tokens=8, temperature=0)
    assert r.object == "response" and r.id.startswith("resp_")
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output_text and r.usage.output_tokens == 8
    # previous_response_id: the kept conversation (the first prompt and its answer) goes first.
    again = client.responses.create(model="x", input="and again", previous_response_id=r.id, max_output_tokens=4)
    assert again.usage.input_tokens > r.usage.input_tokens + 8
    with client.responses.stream(model="x", input="[[script]]Hello from pensieve.[[/script]]", max_output_tokens=40) as s:
        kinds = []
        text = ""
        for e in s:
            kinds.append(e.type)
            if e.type == "response.output_text.delta":
                text += e.delta
        final = s.get_final_response()
    assert text == "Hello from pensieve." == final.output_text and final.status == "completed"
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model="x", input="x", previous_response_id="resp_gone")
    assert e.value.body["param"] == "previous_response_id"


def test_responses_function_calls_round_trip(client):
    tools = [{"type": "function", "name": "get_weather", "parameters": WEATHER["function"]["parameters"]}]
    r = client.responses.create(model="x", input="weather?", tools=tools, tool_choice="required", max_output_tokens=40)
    [call] = [o for o in r.output if o.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments)["city"] in ("Oslo", "Rome")
    out = client.responses.create(model="x", previous_response_id=r.id, tools=tools, max_output_tokens=4,
                                  input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    assert out.usage.input_tokens > r.usage.input_tokens
