"""A prompt read in small chunks beside a decoding stream: its KV cache is allocated once for
the whole prompt (not grown 256 positions at a time, each growth a copy of the cache), and
grows as mlx-lm's does again once it decodes."""

import copy
import json

import mlx.core as mx
import pytest
from conftest import add
from mlx_lm.models.cache import BatchKVCache
from pensieve_bridge import prompt_batch, speculate
from pensieve_bridge.batch import Batcher
from pensieve_bridge.prompt_batch import STEP, PromptBatch, merge


def beside_a_stream(engine):
    """A batcher with a stream decoding (three steps in) and a 700-word prompt just added, 50
    tokens at temperature 0: ``(batcher, stream, long, the long prompt's tokens)``."""
    b = Batcher(engine, 4, 0, max_decode_stall_ms=500)
    stream, _, _ = add(b, json.dumps({"messages": [{"role": "user", "content": "hi"}]}), json.dumps({"max_tokens": 10_000, "temperature": 0}))
    for _ in range(3):
        b.step()
    words = " ".join(f"w{i % 97}" for i in range(700))
    long, n, _ = add(b, json.dumps({"messages": [{"role": "user", "content": words}]}), json.dumps({"max_tokens": 50, "temperature": 0}))
    return b, stream, long, n


def test_a_long_prompt_read_in_small_chunks_beside_a_stream_grows_its_cache_once_into_a_buffer_made_ahead(engine):
    b, stream, long, n = beside_a_stream(engine)
    assert n > 4 * STEP, n
    gen = b._gen
    buffers, ahead, chunks = [], set(), 0
    while b.prefill_progress([long])[0] < n:
        b.step()
        caches = [c for c in gen._prompt_batch.prompt_cache if isinstance(c, BatchKVCache) and c.keys is not None]
        if caches:
            chunks += 1
            # The buffer, and its size: a growth makes a new one.
            if (buffer := (id(caches[0].keys), caches[0].keys.shape[2])) not in buffers:
                buffers.append(buffer)
            if "ahead" in caches[0].__dict__:
                ahead.add(id(caches[0].ahead[0]))
        assert chunks < 2000
    assert chunks >= 8, chunks  # read in many chunks beside the stream
    # mlx-lm's step for the first chunk, then the rest of the prompt at once (256 at a time
    # would be ~n / 256 buffers), into the buffer made ahead for it.
    assert [size for _, size in buffers][:1] == [STEP] and len(buffers) == 2, buffers
    assert buffers[1][0] in ahead
    assert n - 1 <= buffers[1][1] < n + STEP, (buffers, n)
    # Decoding, in the generation batch: its growth step is mlx-lm's again.
    for _ in range(3):
        b.step()
    assert long in gen._generation_batch.uids
    # Its growth step is mlx-lm's again, and a buffer made ahead is for the decoding batch's
    # own next growth (not the prompt's).
    for c in gen._generation_batch.prompt_cache:
        assert "step" not in c.__dict__
        assert "ahead" not in c.__dict__ or prompt_batch._fits(c, c.ahead, c.keys.shape[2] + 1)
    b.cancel([stream, long])


def cache(left_padding, lengths, heads=2, dim=4, seed=0):
    """A BatchKVCache that took ``lengths`` tokens in turn (random keys and values)."""
    mx.random.seed(seed)
    c = BatchKVCache(left_padding)
    for n in lengths:
        shape = (len(left_padding), heads, n, dim)
        c.update_and_fetch(mx.random.normal(shape), mx.random.normal(shape))
    return c


@pytest.mark.parametrize(
    "a, b",
    [
        (([0], [20]), ([0], [300])),  # a short stream, then a long prompt (the usual move)
        (([0], [300]), ([0], [20])),  # the long one decoding, a short prompt moving in
        (([3, 0], [40, 1, 1]), ([0, 5], [600])),  # padding on both sides, growth steps
        (([0], [250, 1, 1, 1, 1, 1, 1, 1]), ([0], [255])),  # a's buffer longer, b's index further: a is cut
        (([0], [5]), ([0], [5])),
    ],
)
def test_merge_writes_what_mlx_lms_extend_gives_in_one_copy(a, b):
    ours, theirs = cache(*a, seed=1), copy.deepcopy(cache(*a, seed=1))
    other = cache(*b, seed=2)
    merge([ours], [other])
    theirs.extend(copy.deepcopy(other))
    for name in ("keys", "values", "offset", "left_padding"):
        x, y = getattr(ours, name), getattr(theirs, name)
        assert x.shape == y.shape, name
        assert mx.array_equal(x, y).item(), name
    assert ours._idx == theirs._idx
    # It decodes on as mlx-lm's does.
    for c in (ours, theirs):
        c.update_and_fetch(mx.ones((c.keys.shape[0], 2, 1, 4)), mx.ones((c.keys.shape[0], 2, 1, 4)))
    assert mx.array_equal(ours.keys, theirs.keys).item() and ours._idx == theirs._idx


def test_merge_extends_as_mlx_lm_does_when_a_side_has_no_keys_yet():
    ours, theirs, full = BatchKVCache([0]), BatchKVCache([0]), cache([0], [7])
    merge([ours], [full])
    theirs.extend(full)
    assert ours.keys.shape == theirs.keys.shape and mx.array_equal(ours.keys, theirs.keys).item() and ours._idx == 7


def test_a_split_that_takes_every_prompt_moves_the_caches_without_copying_them(engine):
    b = Batcher(engine, 4, 0)
    add(b, json.dumps({"messages": [{"role": "user", "content": "hi there"}]}), json.dumps({"max_tokens": 5, "temperature": 0}))
    gen = b._gen
    gen._prompt_batch.extend(gen._make_batch(1))
    gen._prompt_batch.prompt([gen._currently_processing[0][0][0][:-1]])
    batch = gen._prompt_batch
    before = [c.keys for c in batch.prompt_cache]
    moved = batch.split([0])
    assert all(x is y for x, y in zip((c.keys for c in moved.prompt_cache), before, strict=True))
    assert len(batch) == 0 and batch.prompt_cache == [] and len(moved) == 1
    gen._currently_processing.clear()


def test_merge_writes_into_the_buffers_reserved_for_it_when_they_fit():
    ours, theirs, other = cache([0], [20], seed=1), cache([0], [20], seed=1), cache([0], [300], seed=2)
    keys = mx.zeros((2, 2, other.keys.shape[2], 4))
    mx.eval(keys)
    # Keys reserved in the right shape, values in a wrong one (the batch changed since).
    other.reserved = {"keys": keys, "values": mx.zeros((3, 2, other.keys.shape[2], 4))}
    theirs.extend(copy.deepcopy(other))
    merge([ours], [other])
    assert ours.keys is keys  # written in place
    for name in ("keys", "values", "offset", "left_padding"):
        assert mx.array_equal(getattr(ours, name), getattr(theirs, name)).item(), name
    assert "reserved" not in other.__dict__


def long_prompt_beside_a_stream(engine, watch=None):
    """A 700-word prompt read in budgeted chunks beside a decoding stream, to its 50 tokens at
    temperature 0: its pieces. ``watch(gen, moved)`` is called before each step until it has
    moved into the decoding batch, and once after (``moved`` True)."""
    b, stream, long, _ = beside_a_stream(engine)
    out, steps, decoding = [], 0, False
    while True:
        if watch is not None and not decoding:
            decoding = long in b._gen._generation_batch.uids
            watch(b._gen, decoding)
        stepped = [s for s in b.step() if s.uid == long]
        out += [(p.kind, p.payload) for s in stepped for p in s.pieces]
        if any(s.finish is not None for s in stepped):
            break
        steps += 1
        assert steps < 3000
    b.cancel([stream])
    return out


def test_a_long_prompt_moves_into_buffers_made_in_the_steps_before(engine, monkeypatch):
    reserved, moved = [], []

    def watch(gen, decoding):
        if decoding:
            moved[:] = [(c.keys, c.values) for c in gen._generation_batch.prompt_cache]
            return
        caches = gen._prompt_batch.prompt_cache
        if caches and all(len(c.__dict__.get("reserved", {})) == 2 for c in caches):
            reserved[:] = [dict(c.reserved) for c in caches]

    out = long_prompt_beside_a_stream(engine, watch)
    # Made before the move, and moved into: right after it, the decoding batch's arrays are
    # those buffers.
    assert reserved, "no buffers were made ahead"
    assert len(moved) == len(reserved)
    for (keys, values), r in zip(moved, reserved):
        assert keys is r["keys"] and values is r["values"]
    # The text is what the same batch gives without buffers made ahead.
    monkeypatch.setattr(PromptBatch, "reserve", lambda self, generation, steps_left: 0)
    assert long_prompt_beside_a_stream(engine) == out


def test_a_cache_grown_into_a_buffer_made_ahead_gives_the_same_text(engine, monkeypatch):
    out = long_prompt_beside_a_stream(engine)
    monkeypatch.setattr(prompt_batch, "_make_ahead", lambda c, left: None)
    assert long_prompt_beside_a_stream(engine) == out


def decoded_alone(engine, watch=None):
    """One stream decoding 700 tokens at temperature 0 past two of its cache's growths: its
    pieces. ``watch(gen)`` is called before each step."""
    b = Batcher(engine, 4, 0)
    uid, _, _ = add(b, json.dumps({"messages": [{"role": "user", "content": "hi"}]}), json.dumps({"max_tokens": 700, "temperature": 0}))
    out = []
    for _ in range(3000):
        if watch is not None:
            watch(b._gen)
        stepped = [s for s in b.step() if s.uid == uid]
        out += [(p.kind, p.payload) for s in stepped for p in s.pieces]
        if any(s.finish is not None for s in stepped):
            return out
    raise AssertionError("the stream did not finish")


def test_a_decoding_batch_grows_its_caches_into_buffers_made_ahead(engine, monkeypatch):
    grown, taken, ahead = [], [], {}

    def watch(gen):
        caches = gen._generation_batch.prompt_cache
        if not caches or caches[0].keys is None:
            return
        c = caches[0]
        if grown and grown[-1][1] != c.keys.shape[2]:
            taken.append(ahead.get("keys") is c.keys)
        if not grown or grown[-1][1] != c.keys.shape[2]:
            grown.append((id(c.keys), c.keys.shape[2]))
        if "ahead" in c.__dict__:
            ahead["keys"] = c.ahead[0]

    out = decoded_alone(engine, watch)
    # Two growths or more, each into the buffer made for it in the steps before.
    assert len(taken) >= 2 and all(taken), (grown, taken)
    # The text is what mlx-lm's own growth gives.
    monkeypatch.setattr(speculate, "grow_ahead", lambda caches, most: None)
    assert decoded_alone(engine) == out
