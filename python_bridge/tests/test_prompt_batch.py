"""A prompt read in small chunks beside a decoding stream: its KV cache is allocated once for
the whole prompt (not grown 256 positions at a time, each growth a copy of the cache), and
grows as mlx-lm's does again once it decodes."""

import json

from conftest import add
from mlx_lm.models.cache import BatchKVCache
from pensieve_bridge.batch import Batcher
from pensieve_bridge.prompt_batch import STEP


def test_a_long_prompt_read_in_small_chunks_allocates_its_cache_once(engine):
    b = Batcher(engine, 4, 0, max_decode_stall_ms=500)
    stream, _, _ = add(b, json.dumps({"messages": [{"role": "user", "content": "hi"}]}), json.dumps({"max_tokens": 10_000, "temperature": 0}))
    for _ in range(3):
        b.step()
    words = " ".join(f"w{i % 97}" for i in range(700))
    long, n, _ = add(b, json.dumps({"messages": [{"role": "user", "content": words}]}), json.dumps({"max_tokens": 50, "temperature": 0}))
    assert n > 4 * STEP, n
    gen = b._gen
    buffers, chunks = set(), 0
    while b.prefill_progress([long])[0] < n:
        b.step()
        caches = [c for c in gen._prompt_batch.prompt_cache if isinstance(c, BatchKVCache) and c.keys is not None]
        if caches:
            chunks += 1
            # The buffer, and its size: a growth would make a new one.
            buffers.add((id(caches[0].keys), caches[0].keys.shape[2]))
        assert chunks < 2000
    assert chunks >= 8, chunks  # read in many chunks beside the stream
    assert len(buffers) == 1, sorted(buffers, key=lambda x: x[1])  # 256 at a time would be ~n / 256
    ((_, size),) = buffers
    assert n - 1 <= size < n + STEP, (size, n)
    # Decoding, in the generation batch: its growth step is mlx-lm's again.
    for _ in range(3):
        b.step()
    assert long in gen._generation_batch.uids
    assert all("step" not in c.__dict__ for c in gen._generation_batch.prompt_cache)
    b.cancel([stream, long])
