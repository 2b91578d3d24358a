"""Tokens per second of a constrained generation against an unconstrained one, side by side.

``python benches/constrained.py [MODEL]`` (default ``demo``; ``make bench`` also runs it on
SmolLM2). Each round runs the same prompt twice through the bridge's batcher, once free and
once held to a JSON schema by llguidance, alternating which goes first; the decode rate counts
the tokens after the first (prefill excluded). Prints each rate's median and the ratio, then
the median cost of one token's mask alone (llguidance) and with applying it to the logits.

The schema is one free string, so that the demo model (random text, which never closes the
string) decodes exactly ``TOKENS`` tokens both ways; a real model may close it sooner, and its
rate is still per token.
"""

import json
import os
import statistics
import sys
import time

from pensieve_bridge import blas

blas.preload("auto")

from pensieve_bridge.batch import Batcher  # noqa: E402
from pensieve_bridge.engine import Engine  # noqa: E402

TOKENS = int(os.environ.get("TOKENS", "128"))
ROUNDS = int(os.environ.get("ROUNDS", "7"))
SCHEMA = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}


def decode_rate(batcher, chat, constraint):
    params = {"max_tokens": TOKENS, "temperature": 0.7}
    if constraint:
        params["constraint"] = {"type": "json_schema", "schema": SCHEMA}
    added = batcher.add(chat, json.dumps(params), 0)
    assert added[0] == 0, added
    first, n = None, 0
    while batcher._running:
        out = batcher.step()
        if out:
            n += 1
            if first is None:
                first = time.perf_counter()
    return (n - 1) / (time.perf_counter() - first), n


def mask_cost(batcher, engine):
    """Median µs of one mask (llguidance alone, and applied to a row of logits), over the
    tokens of a JSON text."""
    import mlx.core as mx
    import numpy as np
    from llguidance.numpy import fill_next_token_bitmask

    c = batcher._grammars.compile({"type": "json_schema", "schema": SCHEMA}, None)
    logits = mx.zeros((1, c._vocab))
    text = '{"story":"Once upon a time a lighthouse keeper lived alone by the sea, and every night he'
    alone, applied = [], []
    for token in engine.tokenizer.encode(text, add_special_tokens=False):
        t0 = time.perf_counter()
        fill_next_token_bitmask(c.matcher, c._bitmask, 0)
        t1 = time.perf_counter()
        allowed = np.unpackbits(c._bitmask.view(np.uint8), bitorder="little")[: c._vocab]
        mx.eval(mx.where(mx.array(allowed.astype(np.bool_)), logits, -mx.inf))
        t2 = time.perf_counter()
        alone.append(t1 - t0)
        applied.append(t2 - t0)
        assert c.matcher.consume_token(token), c.matcher.get_error()
    return statistics.median(alone) * 1e6, statistics.median(applied) * 1e6, c._vocab


def main():
    model = sys.argv[1] if len(sys.argv) > 1 else "demo"
    engine = Engine(model, 1 << 30)
    batcher = Batcher(engine, 4, 0)
    chat = json.dumps({"messages": [{"role": "user", "content": "Tell me a short story about a lighthouse, as JSON."}]})
    decode_rate(batcher, chat, True)  # warm-up: compiles the tokenizer's llguidance view
    free, held = [], []
    for r in range(ROUNDS):
        order = [(False, free), (True, held)] if r % 2 == 0 else [(True, held), (False, free)]
        for constraint, rates in order:
            rate, n = decode_rate(batcher, chat, constraint)
            rates.append(rate)
    f, h = statistics.median(free), statistics.median(held)
    print(f"model {model}: {TOKENS} tokens, {ROUNDS} rounds")
    print(f"unconstrained  median {f:8.1f} tokens/s")
    print(f"constrained    median {h:8.1f} tokens/s")
    print(f"ratio constrained/unconstrained {h / f:.3f}")
    alone, applied, vocab = mask_cost(batcher, engine)
    print(f"one token's mask ({vocab} tokens): {alone:.0f} us in llguidance, {applied:.0f} us applied")


if __name__ == "__main__":
    main()
