"""The prompt cache holds what it reports: measured with MLX's own active-memory counter."""

import gc
import json
import random

import mlx.core as mx
from conftest import add, running
from mlx_lm.models.cache import BatchKVCache, KVCache
from pensieve_bridge.batch import Batcher
from pensieve_bridge.prompt_cache import PromptCache, own

#: What MLX's allocator may hold beyond the arrays' bytes (alignment of small buffers).
SLACK = 64 << 10


def active():
    gc.collect()
    return mx.get_active_memory()


def test_an_entry_cut_from_a_batch_buffer_holds_only_its_own_bytes():
    # A batch of 8 sequences, 3 heads, 600 positions allocated, 64 wide: what BatchKVCache holds.
    batch = BatchKVCache(left_padding=[0] * 8)
    keys = mx.random.normal((8, 3, 100, 64))
    batch.update_and_fetch(keys, keys + 1)
    mx.eval(batch.keys, batch.values)
    before = active()
    layer = batch.extract(2)  # a lazy slice of the whole batch buffer
    cache = PromptCache("model", 1 << 30)
    cache.insert(list(range(100)), [layer])
    del batch, keys
    held = active() - before
    # Before `own`, this pinned the whole batch buffer: 8 sequences, padded to 256 positions.
    assert cache.nbytes == 2 * 3 * 100 * 64 * 4
    assert held <= cache.nbytes + SLACK, (held, cache.nbytes)
    cache.clear()
    assert active() <= before - 2 * 8 * 3 * 256 * 64 * 4 + SLACK


def test_a_step_padded_cache_is_trimmed_to_the_tokens_it_holds():
    layer = KVCache()
    layer.update_and_fetch(mx.ones((1, 2, 10, 16)), mx.ones((1, 2, 10, 16)))
    assert layer.keys.shape[2] == 256  # allocated in steps
    assert own([layer]) == 2 * 2 * 10 * 16 * 4
    assert layer.keys.shape[2] == 10 and layer.offset == 10
    # Still a working cache: mlx-lm can extend it.
    k, _ = layer.update_and_fetch(mx.zeros((1, 2, 1, 16)), mx.zeros((1, 2, 1, 16)))
    assert k.shape[2] == 11 and layer.offset == 11


SYSTEM = "You are a helpful assistant. " * 20


def chat(q):
    return json.dumps({"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]})


def soak(batcher, rng, n):
    """``n`` requests of mixed lengths, six at a time, a fifth of them cancelled early."""
    for _ in range(n):
        while running(batcher) >= 6:
            batcher.step()
        q = "question %d %s" % (rng.randint(0, 30), "x" * rng.randint(0, 200))
        params = json.dumps({"max_tokens": rng.randint(1, 40), "temperature": 0.7})
        uid, _, _ = add(batcher, chat(q), params)
        if rng.random() < 0.2:
            batcher.step()
            batcher.cancel([uid], keep=True)
    while running(batcher):
        batcher.step()


def test_after_batched_requests_idle_memory_is_what_the_cache_reports(engine):
    engine.clear_cache()
    weights = active()
    b = Batcher(engine, 6, 2048 << 20)
    soak(b, random.Random(0), 120)
    engine.clear_cache()
    nbytes, entries = b.prompt_cache_stats()
    held = active() - weights
    assert entries > 10
    # Before entries owned their memory: 88 MB held for 17 MB reported.
    assert nbytes <= held <= nbytes + entries * SLACK // 16 + SLACK, (held, nbytes)
    b.drop_prompt_cache()
    assert active() - weights <= 1024


def test_the_cap_holds_in_mlx_active_memory(engine):
    engine.clear_cache()
    weights = active()
    cap = 1 << 20
    b = Batcher(engine, 6, cap)
    soak(b, random.Random(1), 60)
    engine.clear_cache()
    assert b.prompt_cache_stats()[0] <= cap
    assert active() - weights <= cap + SLACK
    b.drop_prompt_cache()
