"""The step budget: while a stream decodes, a long prompt is read in chunks of about
``max_decode_stall_ms`` of prefill, one chunk per step, so the stream gets a token every step."""

import json

from conftest import add
from pensieve_bridge.batch import PREFILL_STEP, Batcher
from pensieve_bridge.step_budget import FIRST, FLOOR, RELATIVE, StepBudget


def settled(b, prompts=1):
    """The chunk once the growth limit has let it reach what the rate and the target give."""
    for _ in range(12):
        chunk = b.tokens(decoding=True, prompts=prompts)
    return chunk


def test_the_budget_is_full_when_nothing_decodes_and_follows_the_measured_rate():
    b = StepBudget(500, 2048)
    assert b.tokens(decoding=False) == 2048
    assert b.tokens(decoding=True) == FIRST  # rate not known yet
    b.learn(2048, 1.0)  # 2,048 tokens/s
    assert b.tokens(decoding=True) == FIRST  # the decoding step not known yet
    b.learn_decode(0.2)  # five of them are more than 500 ms
    assert settled(b) == 1024  # half a second of it
    assert b.tokens(decoding=True, prompts=2) == 512  # two prompts share the step
    b.learn(100, 10.0)  # far slower now: the rate follows at once, the floor holds
    assert b.tokens(decoding=True) == FLOOR
    assert StepBudget(0, 2048).tokens(decoding=True) == 2048  # 0: off
    b.learn(3, 0.0)  # too little to learn from: ignored
    assert b.rate > 0


def test_the_budget_is_a_few_decoding_steps_when_they_are_short():
    b = StepBudget(500, 2048)
    b.learn(1000, 1.0)  # 1,000 tokens/s: 500 ms of it is 500 tokens
    b.learn_decode(0.5)
    assert settled(b) == 500
    b = StepBudget(500, 2048)
    b.learn(1000, 1.0)
    b.learn_decode(0.040)  # a 40 ms step: RELATIVE of them is under 500 ms
    assert b.target == RELATIVE * 0.040 < 0.5
    assert settled(b) == int(1000 * RELATIVE * 0.040)
    b.learn_decode(0.400)  # one slow step (a render on another thread): followed slowly
    assert 0.040 < b.decode < 0.1
    b.learn_decode(0.030)  # a faster one: at once
    assert b.decode == 0.030
    slow = StepBudget(500, 2048)
    slow.learn(1000, 1.0)
    slow.learn_decode(1.0)  # long steps: the configured stall caps the chunk
    assert settled(slow) == 500
    fast = StepBudget(500, 2048)
    fast.learn(2000, 1.0)
    fast.learn_decode(0.0005)  # a 0.5 ms step: the floor, not a chunk of 500 ms
    assert settled(fast) == FLOOR
    assert fast.tokens(decoding=False) == 2048


def test_a_chunk_grows_at_most_twofold_and_the_rate_follows_a_slower_step_at_once():
    # A few tokens at the start of a prompt read fast (little context to attend to): the rate
    # they show would make the next chunk hundreds of tokens, far slower than the target once
    # the context has grown. The chunk doubles at most, step by step.
    b = StepBudget(500, 2048)
    b.learn_decode(0.001)  # a 1 ms decoding step: 5 ms of prefill a step
    assert b.tokens(decoding=True) == FIRST
    b.learn(FIRST, 0.0001)  # 80,000 tokens/s: 400 tokens in 5 ms
    chunks = [b.tokens(decoding=True) for _ in range(8)]
    assert chunks == [16, 32, 64, 128, 256, 400, 400, 400], chunks
    b.learn(400, 0.020)  # 400 tokens took 20 ms: 20,000 tokens/s
    assert b.rate == 20_000
    assert b.tokens(decoding=True) == 100
    b.learn(100, 0.001)  # faster again: the average moves a third of the way
    assert 20_000 < b.rate < 100_000 / 2


def steps_until_first_token(engine, stall_ms):
    b = Batcher(engine, 4, 0, max_decode_stall_ms=stall_ms)
    stream, _, _ = add(b, json.dumps({"messages": [{"role": "user", "content": "hi"}]}), json.dumps({"max_tokens": 10_000, "temperature": 0}))
    for _ in range(3):
        b.step()
    words = " ".join(f"w{i % 97}" for i in range(700))
    long, n, _ = add(b, json.dumps({"messages": [{"role": "user", "content": words}]}), json.dumps({"max_tokens": 1, "temperature": 0}))
    assert n > 3 * FLOOR
    steps, stream_tokens, read = 0, 0, []
    while True:
        out = b.step()
        read.append(b.prefill_progress([long, stream, 12345])[0])
        steps += 1
        stream_tokens += sum(1 for uid, _, _ in out if uid == stream)
        if any(uid == long for uid, _, _ in out):
            break
        assert steps < n // FLOOR + 20, (steps, n)
    b.cancel([stream, long])
    assert b.prefill_progress([long]) == [-1]
    # What is read of the long prompt only grows, to the whole prompt (its last token gives its
    # first, and only, token: it has left when that step ends).
    assert read[-1] == -1
    read = read[:-1]
    assert read == sorted(read) and n - 1 <= read[-1] <= n and 0 < read[0], (read, n)
    if stall_ms:
        assert read[0] < n
    return steps, stream_tokens, n


def test_a_long_prompt_is_read_in_budgeted_chunks_while_a_stream_decodes(engine):
    # 1 ms: chunks of a millisecond of prefill (the floor's size, or a few tokens more on a fast
    # machine); the stream gets a token at every step.
    steps, stream_tokens, n = steps_until_first_token(engine, 1)
    assert steps >= n // (4 * FLOOR), (steps, n)
    assert stream_tokens >= steps - 1, (stream_tokens, steps)
    # Without a budget, the same prompt is read in one step of PREFILL_STEP tokens.
    assert n < PREFILL_STEP
    budgeted = steps
    steps, _, _ = steps_until_first_token(engine, 0)
    assert steps <= 3 < budgeted, (steps, budgeted)


def test_a_stream_that_starts_beside_a_long_prompt_is_not_stalled_by_it(engine):
    # Both arrive together: the first step reads both prompts with nothing decoding (a full
    # chunk), then the short one decodes while the long one is still read. No step has decoded
    # alone yet, so the budget's decoding step comes from the steps beside the prompt: the rest
    # of the long prompt is read in small chunks, not in 500 ms of prefill at once.
    b = Batcher(engine, 4, 0, max_decode_stall_ms=500)
    stream, _, _ = add(b, json.dumps({"messages": [{"role": "user", "content": "hi"}]}), json.dumps({"max_tokens": 10_000, "temperature": 0}))
    words = " ".join(f"w{i % 97}" for i in range(1500))
    long, n, _ = add(b, json.dumps({"messages": [{"role": "user", "content": words}]}), json.dumps({"max_tokens": 1, "temperature": 0}))
    assert n > PREFILL_STEP + 200, n
    reads, stream_tokens = [], 0
    while True:
        out = b.step()
        stream_tokens += sum(1 for uid, _, _ in out if uid == stream)
        if any(uid == long for uid, _, _ in out):
            break
        reads.append(b.prefill_progress([long])[0])
        assert len(reads) < 2000
    b.cancel([stream])
    after_first = [r for r in reads if r > PREFILL_STEP]
    assert len(after_first) >= 5, reads[:10]  # the rest of the prompt in several steps
    assert max(b - a for a, b in zip(after_first, after_first[1:])) < 400, after_first[:10]
    assert stream_tokens >= len(after_first) - 1
