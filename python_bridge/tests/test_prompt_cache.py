"""The prompt cache holds what it reports: measured with MLX's own active-memory counter."""

import gc
import json
import random

import mlx.core as mx
from conftest import add, running
from mlx_lm.models.cache import BatchKVCache, KVCache, LRUPromptCache, PromptTrie
from pensieve_bridge.batch import Batcher
from pensieve_bridge.prompt_cache import PromptCache, Trie, own

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


class _Layer:
    """A cache layer as LRUPromptCache sees it: its bytes, and whether it can be trimmed."""

    nbytes = 1

    def __init__(self, trimmable):
        self.trimmable = trimmable

    def is_trimmable(self):
        return self.trimmable


def test_the_trie_search_finds_what_mlx_lms_finds_without_walking_the_cached_prompts():
    # Prompts that share a system prompt, then go their own way for a long stretch (an agent's
    # turns), and some that stop inside others: every lookup answers as mlx-lm's own search
    # does (the same exact and shorter entries, the same common prefix, a longer entry as short
    # as its).
    rng = random.Random(7)
    ours = LRUPromptCache(max_size=64)
    ours._trie = Trie(ours._lru)
    theirs = PromptTrie()
    system = [rng.randrange(50) for _ in range(40)]
    cached = []
    for _ in range(30):
        tokens = system[: rng.choice([0, 10, 40])] + [rng.randrange(50) for _ in range(rng.randrange(1, 300))]
        if cached and rng.random() < 0.3:
            other = rng.choice(cached)
            tokens = other[: rng.randrange(1, len(other) + 1)]  # a prefix of another entry
        trimmable = rng.random() < 0.5
        ours.insert_cache("m", list(tokens), [_Layer(trimmable)])
        cached.append(tokens)
    ours.insert_cache("m", [5], [_Layer(False)])  # a one-token entry: mlx-lm never calls it a prefix
    for model, tokens in (pair for lru in ours._lru._lrus.values() for pair in lru):
        theirs.add(model, tokens, object())
    probes = [c[: rng.randrange(0, len(c) + 1)] + [rng.randrange(50) for _ in range(rng.randrange(0, 20))] for c in cached]
    probes += [[], [99], [5], [5, 6, 7], system, system + [1, 2, 3]]
    for tokens in probes:
        a, b = ours._trie.search("m", tokens), theirs.search("m", tokens)
        assert (a.exact, a.shorter, a.common_prefix) == (b.exact, b.shorter, b.common_prefix), tokens
        assert (a.longer is None) == (b.longer is None), tokens
        if a.longer is not None:
            assert len(a.longer) == len(b.longer) and a.longer[: a.common_prefix] == tokens[: a.common_prefix]
            assert ours._trie.get("m", a.longer) is not None  # an entry of the cache
    assert ours._trie.search("other", [1, 2]).exact is None
