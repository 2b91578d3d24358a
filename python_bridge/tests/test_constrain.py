"""Constrained decoding on the demo model, whose weights are random: whatever it would say, the
constraint alone must make every forced call and every structured output valid."""

import json

import jsonschema
import mlx.core as mx
from conftest import add, full, reference_generate, running
from pensieve_bridge.batch import Batcher
from pensieve_bridge.protocol import Added, Finish, Piece

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 16},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "unit": {"enum": ["C", "F"]},
    },
    "required": ["city", "days", "unit"],
    "additionalProperties": False,
}
CLOCK = {
    "type": "object",
    "properties": {"zone": {"enum": ["UTC", "CET", "JST"]}, "seconds": {"type": "boolean"}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Time", "parameters": CLOCK}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": CLOCK}
ANSWER = {
    "type": "object",
    "properties": {
        "verdict": {"enum": ["yes", "no", "unsure"]},
        "confidence": {"type": "integer", "minimum": 0, "maximum": 100},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["verdict", "confidence", "tags"],
    "additionalProperties": False,
}


def chat(question, tools=None):
    c = {"messages": [{"role": "user", "content": question}]}
    if tools:
        c["tools"] = tools
    return json.dumps(c)


def params(constraint, max_tokens=200, temperature=1.0):
    return json.dumps({"max_tokens": max_tokens, "temperature": temperature, "constraint": constraint})


def run(batcher):
    out, finishes = {}, {}
    while running(batcher):
        for uid, pieces, finish in batcher.step():
            out.setdefault(uid, []).extend(pieces)
            if finish is not None:
                finishes[uid] = finish
    return out, finishes


def test_a_forced_call_is_always_a_valid_call_to_an_allowed_tool(engine):
    b = Batcher(engine, 4, 0)
    names = set()
    for seed in range(24):
        mx.random.seed(seed)
        allowed = ["get_weather", "get_time"] if seed % 2 else ["get_weather"]
        uid, _, _ = add(b, chat(f"question {seed}", TOOLS), params({"type": "tool", "names": allowed}))
        out, finishes = run(b)
        assert finishes[uid] == Finish.TOOL_USE, out[uid]
        call = streamed_call(out[uid])
        assert call["name"] in allowed
        jsonschema.validate(call["arguments"], SCHEMAS[call["name"]])
        names.add(call["name"])
    assert names == {"get_weather", "get_time"}, "sampling never chose the second tool"
    assert engine.clear_cache() == 0


def test_structured_output_always_validates_and_streams_as_text(engine):
    b = Batcher(engine, 4, 0)
    for seed in range(16):
        mx.random.seed(seed)
        uid, _, _ = add(b, chat(f"judge {seed}"), params({"type": "json_schema", "schema": ANSWER}))
        out, finishes = run(b)
        assert finishes[uid] == Finish.STOP
        assert all(kind == Piece.TEXT for kind, _ in out[uid])
        assert len(out[uid]) > 3, "the text came in one piece, not streamed"
        jsonschema.validate(json.loads("".join(p for _, p in out[uid])), ANSWER)


def test_a_constrained_request_leaves_the_others_in_its_batch_untouched(engine):
    greedy = json.dumps({"max_tokens": 24, "temperature": 0})
    alone = "".join(t for t, _ in reference_generate(engine, engine.render(chat("hello there")), greedy))
    b = Batcher(engine, 4, 0)
    free, _, _ = add(b, chat("hello there"), greedy)
    forced, _, _ = add(b, chat("weather", TOOLS), params({"type": "tool", "names": ["get_time"]}))
    out, finishes = run(b)
    assert "".join(p for _, p in out[free]) == alone
    assert finishes[free] == Finish.LENGTH and finishes[forced] == Finish.TOOL_USE


def test_a_schema_the_engine_cannot_use_is_refused_naming_the_field(engine):
    b = Batcher(engine, 4, 0)
    bad = {"type": "object", "properties": {"a": {"$ref": "#/definitions/missing"}}}
    r = b.add(chat("x"), full(params({"type": "json_schema", "schema": bad})), 0)
    assert r.code == Added.REFUSED
    assert r.field == "output_config.format.schema" and "missing" in r.message
    r = b.add(chat("x", TOOLS), full(params({"type": "tool", "names": ["nope"]})), 0)
    assert r.code == Added.REFUSED and r.field == "tool_choice" and "nope" in r.message
    assert running(b) == 0


def streamed_call(pieces):
    """The call of a forced generation's pieces, checking how it streamed: its start (the name),
    argument fragments whose text joined is the arguments, then the whole call, and nothing
    else."""
    (start, name), *fragments, (end, whole) = pieces
    assert start == Piece.TOOL_START and end == Piece.TOOL, pieces
    assert fragments and all(kind == Piece.TOOL_ARGS for kind, _ in fragments), pieces
    call = json.loads(whole)
    assert call["name"] == name
    assert json.loads("".join(f for _, f in fragments)) == call["arguments"]
    return call


def test_a_call_cut_by_max_tokens_is_still_a_call_its_arguments_completed(engine):
    b = Batcher(engine, 4, 0)
    for max_tokens in (2, 12, 24, 34):
        uid, _, _ = add(b, chat("weather", TOOLS), params({"type": "tool", "names": ["get_weather"]}, max_tokens=max_tokens))
        out, finishes = run(b)
        assert finishes[uid] == Finish.LENGTH
        assert not [p for p in out[uid] if p[0] == Piece.TEXT], out[uid]
        kind, whole = out[uid][-1]
        assert kind == Piece.TOOL, out[uid]
        call = json.loads(whole)
        assert call["name"] == "get_weather" and isinstance(call["arguments"], dict)
        written = "".join(p for k, p in out[uid] if k == Piece.TOOL_ARGS)
        assert all(f'"{key}":' in written for key in call["arguments"]), (written, call)
        assert max_tokens < 24 or call["arguments"], "what was written of the arguments is kept"



def object_keys(text):
    """The keys of every object in the JSON ``text``, as written (a repeated key twice)."""
    objects = []
    json.loads(text, object_pairs_hook=lambda pairs: objects.append([k for k, _ in pairs]) or dict(pairs))
    return objects


def test_an_open_schema_is_closed_no_key_invented_none_repeated(engine):
    """A tool whose schema does not say `additionalProperties` (LangChain's `@tool`, most
    hand-written tools): the forced call has its listed keys only, each once."""
    from pensieve_bridge.constrain import closed

    open_schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "note": {"type": "object", "properties": {"x": {"type": "integer"}}}}, "required": ["city"]}
    shut = closed(open_schema)
    assert shut["additionalProperties"] is False and shut["properties"]["note"]["additionalProperties"] is False
    assert "additionalProperties" not in open_schema, "the schema given is not changed"
    assert closed({"type": "object", "properties": {}, "additionalProperties": True})["additionalProperties"] is True
    assert closed({"type": "object"}) == {"type": "object"}, "an object without properties stays any object"
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": open_schema}}]
    b = Batcher(engine, 4, 0)
    for seed in range(12):
        mx.random.seed(seed)
        uid, _, _ = add(b, chat(f"weather {seed}", tools), params({"type": "tool", "names": ["get_weather"]}, max_tokens=120))
        out, finishes = run(b)
        call = streamed_call(out[uid])
        args_text = "".join(p for k, p in out[uid] if k == Piece.TOOL_ARGS)
        assert set(call["arguments"]) <= {"city", "note"} and "city" in call["arguments"], call
        assert all(len(keys) == len(set(keys)) for keys in object_keys(args_text)), f"a key written twice: {args_text}"


def test_a_schema_keeps_its_property_order(engine):
    """llguidance writes properties in the schema's order: `reasoning` before `answer`."""
    schema = {"type": "object", "properties": {"reasoning": {"type": "string", "maxLength": 20}, "answer": {"type": "string", "maxLength": 5}}, "required": ["reasoning", "answer"]}
    b = Batcher(engine, 4, 0)
    uid, _, _ = add(b, chat("is 17 prime?"), params({"type": "json_schema", "schema": schema}, max_tokens=80))
    out, _ = run(b)
    text = "".join(p for _, p in out[uid])
    assert list(json.loads(text)) == ["reasoning", "answer"], text


def test_strict_tools_under_auto_hold_every_call_the_model_makes(engine):
    """The demo model would almost never open a call by itself, so the logits are scripted here:
    the first step prefers `<tool_call>`, the rest are random. Whatever they say, the grammar
    makes each call valid, then lets the answer end."""
    import numpy as np
    from pensieve_bridge.batch import Batcher

    b = Batcher(engine, 1, 0)
    start = engine.tokenizer._tokenizer.encode(engine.tokenizer.tool_call_start, add_special_tokens=False)[0]
    eos = next(iter(engine.tokenizer.eos_token_ids))
    for seed in range(10):
        rng = np.random.default_rng(seed)
        # Both strict: a non-strict tool takes any object, which random logits never close.
        c = b._grammars.compile({"type": "strict_tools", "strict": ["get_weather", "get_time"]}, TOOLS)
        tokens = [1]
        for step in range(300):
            logits = rng.normal(size=(1, c._vocab)).astype(np.float32)
            if step == 0:
                logits[0, start] = 100.0
            if step > 150:  # late on, the end of the answer is likely wherever it is allowed
                logits[0, eos] = 50.0
            masked = np.array(c(mx.array(tokens), mx.array(logits)))
            token = int(masked[0].argmax())
            tokens.append(token)
            if token == eos:
                break
        text = engine.tokenizer._tokenizer.decode(tokens[1:], skip_special_tokens=False)
        assert tokens[-1] == eos, text
        calls = text.split(engine.tokenizer.tool_call_start)[1:]
        assert calls, text
        for call in calls:
            body = json.loads(call.split(engine.tokenizer.tool_call_end)[0])
            jsonschema.validate(body["arguments"], SCHEMAS[body["name"]])


def test_strict_tools_on_a_model_without_a_special_token_format_are_not_enforced(engine, monkeypatch):
    from pensieve_bridge.constrain import Grammars

    class NoMarkers:
        tool_parser = None
        tool_call_start = None
        tool_call_end = None

    assert Grammars(NoMarkers()).compile({"type": "strict_tools", "strict": ["get_weather"]}, TOOLS) is None
