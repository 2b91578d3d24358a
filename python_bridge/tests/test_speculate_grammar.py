"""Speculation under a grammar: a sequence held to a schema or a forced call drafts the tokens
its grammar forces (and its lookups, cut where the grammar refuses them), and verifies them
under the grammar's masks. At temperature 0 the text is what it is without speculation; when
sampling, every answer still validates."""

import json

import jsonschema
import mlx.core as mx
from conftest import Always, add
from pensieve_bridge import draft as drafting
from pensieve_bridge.batch import Batcher
from pensieve_bridge.engine import Engine
from pensieve_bridge.protocol import Finish
from test_constrain import ANSWER, SCHEMAS, TOOLS, chat, params, streamed_call
from test_constrain import run as run_batch


def run(engine, requests, lookup_tokens, draft=None):
    """``(pieces by request, finishes, speculation_stats)`` of ``requests`` ((chat, params)
    pairs) run together, speculating at every step it can when ``lookup_tokens`` > 0 or there
    is a ``draft`` model."""
    b = Batcher(engine, 4, 0, prompt_lookup_tokens=lookup_tokens, draft=draft)
    b._speculation.pace = Always()
    uids = [add(b, c, p)[0] for c, p in requests]
    out, finishes = run_batch(b)
    return [out.get(u, []) for u in uids], [finishes[u] for u in uids], b.speculation_stats()


def test_under_a_grammar_speculation_drafts_forced_tokens_and_keeps_the_text(engine):
    requests = [
        (chat("judge this", None), params({"type": "json_schema", "schema": ANSWER}, temperature=0)),
        (chat("weather in Paris", TOOLS), params({"type": "tool", "names": ["get_weather", "get_time"]}, temperature=0)),
        (chat("hello there"), json.dumps({"max_tokens": 40, "temperature": 0})),
    ]
    for alone in requests:
        plain, finish_plain, off = run(engine, [alone], 0)
        fast, finish_fast, on = run(engine, [alone], 10)
        assert fast == plain and finish_fast == finish_plain
        assert off[0] == 0
    # Together in one batch: free text beside the two held to grammars.
    plain, _, _ = run(engine, requests, 0)
    fast, finishes, on = run(engine, requests, 10)
    assert fast == plain
    steps, drafted, accepted, sequence_steps, tokens = on
    assert steps > 0 and accepted > 0 and sequence_steps < tokens, on
    jsonschema.validate(json.loads("".join(p for _, p in fast[0])), ANSWER)
    call = streamed_call(fast[1])
    jsonschema.validate(call["arguments"], SCHEMAS[call["name"]])
    assert finishes[:2] == [Finish.STOP, Finish.TOOL_USE]


def test_sampled_answers_under_a_grammar_validate_with_speculation(engine):
    drafted = 0
    for seed in range(8):
        mx.random.seed(seed)
        requests = [
            (chat(f"judge {seed}"), params({"type": "json_schema", "schema": ANSWER})),
            (chat(f"question {seed}", TOOLS), params({"type": "tool", "names": ["get_weather", "get_time"]})),
        ]
        out, finishes, stats = run(engine, requests, 10)
        assert finishes == [Finish.STOP, Finish.TOOL_USE], out
        jsonschema.validate(json.loads("".join(p for _, p in out[0])), ANSWER)
        call = streamed_call(out[1])
        jsonschema.validate(call["arguments"], SCHEMAS[call["name"]])
        drafted += stats[1]
    assert drafted > 0
    assert engine.clear_cache() == 0


def test_a_draft_model_under_a_grammar_keeps_the_text(engine):
    """The draft model proposes what it would say unconstrained: the grammar cuts it (often to
    nothing, when the forced tokens take its place), and its cache follows what was kept."""
    model = drafting.DraftModel(Engine("demo"), engine)
    requests = [
        (chat("judge this", None), params({"type": "json_schema", "schema": ANSWER}, temperature=0)),
        (chat("weather in Paris", TOOLS), params({"type": "tool", "names": ["get_weather", "get_time"]}, temperature=0)),
        (chat("hello there"), json.dumps({"max_tokens": 40, "temperature": 0})),
    ]
    plain, _, _ = run(engine, requests, 0)
    fast, finishes, on = run(engine, requests, 0, model)
    assert fast == plain
    assert on[1] > 0 and on[2] > 0, on
    assert finishes[:2] == [Finish.STOP, Finish.TOOL_USE]
