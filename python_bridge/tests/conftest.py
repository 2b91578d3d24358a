"""Fixtures and helpers shared by the bridge's tests (test-only code lives here, not in the package)."""

import json
import time

from pensieve_bridge import blas

# Before anything imports MLX, as the server does: the tests run on the same BLAS.
blas.preload("auto")

import mlx.core as mx  # noqa: E402
import pytest  # noqa: E402
from mlx_lm import stream_generate  # noqa: E402
from mlx_lm.sample_utils import make_sampler  # noqa: E402
from pensieve_bridge import protocol  # noqa: E402
from pensieve_bridge.engine import Engine  # noqa: E402
from pensieve_bridge.speculate import Pace  # noqa: E402


@pytest.fixture(scope="session")
def engine():
    return Engine("demo")


def running(batcher):
    """How many generations the batcher runs."""
    return len(batcher._running)


def full(params_json):
    """``params_json`` (the fields a test cares about) as Rust sends it: over the golden example
    of ``protocol.json``, whose shape the Rust tests check against what Rust serialises."""
    return json.dumps({**protocol.golden()["examples"]["AddParams"], **json.loads(params_json)})


def add(batcher, chat_json, params_json, context_length=0):
    """``(uid, input_tokens, cached_tokens)`` of a request that starts (asserts it does), added
    again while its prompt's cache is read from disk, as the server's loop does."""
    params_json = full(params_json)
    while True:
        r = batcher.add(chat_json, params_json, context_length)
        if r.code != protocol.Added.READING:
            break
        time.sleep(0.001)
    assert r.code == protocol.Added.STARTED, f"the request did not start: {r}"
    return r.uid, r.input_tokens, r.cached_tokens


def reference_generate(engine, tokens, params_json):
    """``(text, finish_reason)`` per token, one generation on its own with mlx-lm's
    ``stream_generate``: the reference the batched path is compared with."""
    params = json.loads(params_json)
    sampler = make_sampler(
        temp=float(params.get("temperature", 1.0)),
        top_p=float(params.get("top_p") or 0.0),
        top_k=int(params.get("top_k") or 0),
    )
    try:
        for r in stream_generate(
            engine.model, engine.tokenizer, mx.array(tokens), max_tokens=int(params["max_tokens"]), sampler=sampler
        ):
            yield r.text, r.finish_reason
    finally:
        mx.clear_cache()


class Always(Pace):
    """Speculates at every step it can: the tests of speculation's mechanics (drafts, trims,
    rolls, identical text) do not depend on which steps this shared machine times as faster
    (:class:`~pensieve_bridge.speculate.Pace` is tested on its own)."""

    def worth_it(self, size):
        return True


def generate(engine, prompts, lookup_tokens, draft=None, temperature=0.0, max_tokens=120):
    """``(texts, token counts, speculation_stats)`` of ``prompts`` run together in a new
    :class:`~pensieve_bridge.batch.Batcher` with prompt lookup of ``lookup_tokens`` (0: off)
    and ``draft`` (a :class:`~pensieve_bridge.draft.DraftModel`, or None), speculating at
    every step it can (:class:`Always`)."""
    from pensieve_bridge.batch import Batcher

    b = Batcher(engine, 4, 0, prompt_lookup_tokens=lookup_tokens, draft=draft)
    b._speculation.pace = Always()
    uids = {}
    for i, p in enumerate(prompts):
        chat = json.dumps({"messages": [{"role": "user", "content": p}]})
        uid, _, _ = add(b, chat, json.dumps({"max_tokens": max_tokens, "temperature": temperature}))
        uids[uid] = i
    texts, tokens, left = [""] * len(prompts), [0] * len(prompts), len(prompts)
    while left:
        for s in b.step():
            tokens[uids[s.uid]] += 1
            texts[uids[s.uid]] += "".join(o.payload for o in s.pieces)
            left -= s.finish is not None
    return texts, tokens, b.speculation_stats()
