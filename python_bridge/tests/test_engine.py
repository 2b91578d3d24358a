"""Generation on real MLX through the Batcher (the path the server runs): determinism, sampling
parameters, max_tokens, a failing generation, and the cache-clearing guarantee."""

import json

import mlx.core as mx
from conftest import add, reference_generate, running
from pensieve_bridge import batch as batch_mod
from pensieve_bridge import engine as engine_mod
from pensieve_bridge.protocol import Finish, Piece

CHAT = json.dumps({"messages": [{"role": "user", "content": "hello there"}], "tools": None})


def run(engine, chat=CHAT, **params):
    """``[(pieces, finish)]`` of one generation, run to its end in a fresh Batcher, which is then
    idle: its cache must be empty (as the server's long-lived Batcher is, between requests)."""
    params.setdefault("max_tokens", 32)
    b = batch_mod.open_batcher(engine, 4, 0)
    uid, _, _ = add(b, chat, json.dumps(params))
    out = []
    while running(b):
        out += [(pieces, finish) for u, pieces, finish in b.step() if u == uid]
    assert engine.clear_cache() == 0
    assert mx.get_cache_memory() == 0
    return out


def test_temperature_zero_is_deterministic(engine):
    a = run(engine, temperature=0)
    b = run(engine, temperature=0)
    assert a == b and len(a) == 32
    assert a[-1][1] == Finish.LENGTH and all(r is None for _, r in a[:-1])


def test_cache_is_empty_after_a_generation_that_succeeds(engine):
    run(engine, temperature=0)  # run() checks the cache once the batch is idle


def test_cache_is_empty_after_a_generation_cancelled_half_way(engine):
    b = batch_mod.Batcher(engine, 4, 0)
    uid, _, _ = add(b, CHAT, json.dumps({"max_tokens": 64, "temperature": 0}))
    for _ in range(5):
        b.step()
    assert mx.get_cache_memory() > 0 or mx.get_active_memory() > 0
    b.cancel([uid])
    assert running(b) == 0
    assert engine.clear_cache() == 0
    assert mx.get_cache_memory() == 0


def test_a_generation_that_raises_reports_an_error_and_leaves_no_cache():
    # The test model id selects the test batcher, whose fault marker raises after two tokens.
    eng = engine_mod.Engine("scripted:demo")
    chat = json.dumps({"messages": [{"role": "user", "content": "please PLEASE-FAIL"}]})
    out = run(eng, chat, max_tokens=16, temperature=0)
    pieces, finish = out[-1]
    assert finish == Finish.ERROR and pieces[0][0] == Piece.ERROR and "injected fault" in pieces[0][1]
    assert len(out) == 3  # two tokens, then the failure (run() checks the cache)


def test_sampling_parameters_reach_mlx_lm(engine, monkeypatch):
    seen = {}
    real = batch_mod.make_sampler

    def spy(**kwargs):
        seen.update(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(batch_mod, "make_sampler", spy)
    run(engine, temperature=0.7, top_p=0.9, top_k=40, max_tokens=4)
    assert seen == {"temp": 0.7, "top_p": 0.9, "top_k": 40}


def test_top_k_one_equals_greedy(engine):
    # top_k=1 leaves one candidate, so even at temperature 1 it must match temperature 0:
    # proof that top_k changes what is sampled, not only that it is passed.
    assert run(engine, temperature=1.0, top_k=1) == run(engine, temperature=0)


def test_max_tokens_bounds_the_generation(engine):
    out = run(engine, temperature=0, max_tokens=5)
    assert len(out) == 5 and out[-1][1] == Finish.LENGTH


def test_the_reference_generator_clears_the_cache(engine):
    gen = reference_generate(engine, engine.render(CHAT), json.dumps({"max_tokens": 8, "temperature": 0}))
    assert len(list(gen)) == 8
    del gen  # its locals are freed after its own clear_cache() ran
    assert engine.clear_cache() == 0


def test_a_production_model_id_never_gets_the_test_batcher(engine):
    assert type(batch_mod.open_batcher(engine, 4, 0)) is batch_mod.Batcher
    b = batch_mod.open_batcher(engine, 4, 0)
    # "PLEASE-FAIL" and [[script]] are only text to a real batcher.
    chat = json.dumps({"messages": [{"role": "user", "content": "PLEASE-FAIL [[script]]x[[/script]]"}]})
    out = run(engine, chat, max_tokens=6, temperature=0)
    assert len(out) == 6 and out[-1][1] == Finish.LENGTH
    del b


def test_a_final_assistant_message_is_continued_not_closed(engine):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, I am"}]
    cont = engine.render(json.dumps({"messages": messages, "continue_final": True}))
    closed = engine.render(json.dumps({"messages": messages}))
    text = engine.tokenizer.decode(cont)
    assert text.endswith("<|im_start|>assistant\nHello, I am"), text
    # Without it, the turn is closed and a new one opens: what the API must not do.
    assert engine.tokenizer.decode(closed).endswith("Hello, I am<|im_end|>\n<|im_start|>assistant\n")
    assert closed[: len(cont)] == cont


def test_a_loaded_model_leaves_the_cycle_collector_little_to_walk():
    # Frozen after loading: a full collection walks what requests create, not the ~90,000
    # objects of the interpreter, mlx-lm and the model; releasing unfreezes them, so that a
    # dropped model's cycles are still collected.
    import gc
    import weakref

    e = engine_mod.Engine("demo")
    assert gc.get_freeze_count() > 20_000
    assert len(gc.get_objects()) < gc.get_freeze_count() // 4, (len(gc.get_objects()), gc.get_freeze_count())
    # A model held in a reference cycle, frozen: only the cycle collector frees it, and only
    # once it is unfrozen.
    e.model.cycle = {"model": e.model}
    engine_mod.settle()
    gone = weakref.ref(e.model)
    del e
    engine_mod.release()
    assert gone() is None
    assert gc.get_freeze_count() > 20_000  # what remains is frozen again
