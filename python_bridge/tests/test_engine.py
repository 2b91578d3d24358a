"""Generation on real MLX: determinism, sampling parameters, and the cache-clearing guarantee."""

import json

import mlx.core as mx
import pytest

from pensieve_bridge import engine as engine_mod

CHAT = json.dumps({"messages": [{"role": "user", "content": "hello there"}], "tools": None})


def run(engine, **params):
    params.setdefault("max_tokens", 32)
    gen = engine.generate(engine.render(CHAT), json.dumps(params))
    try:
        return list(gen)
    finally:
        gen.close()
        del gen
        engine.clear_cache()


def test_temperature_zero_is_deterministic(engine):
    a = run(engine, temperature=0)
    b = run(engine, temperature=0)
    assert a == b and len(a) == 32
    assert a[-1][1] == "length" and all(r is None for _, r in a[:-1])


def test_cache_is_empty_after_a_generation_that_succeeds(engine):
    run(engine, temperature=0)
    assert mx.get_cache_memory() == 0


def test_cache_is_empty_after_a_generation_closed_half_way(engine):
    gen = engine.generate(engine.render(CHAT), json.dumps({"max_tokens": 64, "temperature": 0}))
    for _ in range(5):
        next(gen)
    assert mx.get_cache_memory() > 0 or mx.get_active_memory() > 0
    gen.close()
    del gen
    assert engine.clear_cache() == 0
    assert mx.get_cache_memory() == 0


def test_cache_is_empty_after_a_generation_that_raises(monkeypatch):
    monkeypatch.setenv(engine_mod.FAULT_MARKER_ENV, "FAIL-HERE")
    eng = engine_mod.Engine("demo")
    chat = json.dumps({"messages": [{"role": "user", "content": "please FAIL-HERE"}]})
    gen = eng.generate(eng.render(chat), json.dumps({"max_tokens": 16, "temperature": 0}))
    with pytest.raises(RuntimeError, match="injected fault"):
        for _ in gen:
            pass
    del gen
    assert eng.clear_cache() == 0
    assert mx.get_cache_memory() == 0


def test_sampling_parameters_reach_mlx_lm(engine, monkeypatch):
    seen = {}
    real = engine_mod.make_sampler

    def spy(**kwargs):
        seen.update(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(engine_mod, "make_sampler", spy)
    run(engine, temperature=0.7, top_p=0.9, top_k=40, max_tokens=4)
    assert seen == {"temp": 0.7, "top_p": 0.9, "top_k": 40}


def test_top_k_one_equals_greedy(engine):
    # top_k=1 leaves one candidate, so even at temperature 1 it must match temperature 0:
    # proof that top_k changes what is sampled, not only that it is passed.
    assert run(engine, temperature=1.0, top_k=1) == run(engine, temperature=0)


def test_max_tokens_bounds_the_generation(engine):
    out = run(engine, temperature=0, max_tokens=5)
    assert len(out) == 5 and out[-1][1] == "length"
