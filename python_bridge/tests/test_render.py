"""Long prompts are rendered off the batch thread: running generations keep stepping while a
long prompt's template and tokenizer run, and what comes out is what rendering on the batch
thread gives."""

import json
import threading
import time

from conftest import add, full
from pensieve_bridge import render
from pensieve_bridge.batch import Batcher
from pensieve_bridge.protocol import Added

LONG = "The quick brown fox jumps over the lazy dog near the river bank. " * 8000  # ~500 KB


def chat(text):
    return json.dumps({"messages": [{"role": "user", "content": text}]})


def test_a_long_prompt_renders_off_the_batch_thread_while_others_step(engine):
    b = Batcher(engine, 4, 0)
    short, _, _ = add(b, chat("hello"), json.dumps({"max_tokens": 100000, "temperature": 0}))
    long_chat = chat(LONG)
    assert len(long_chat) >= render.OFF_THREAD_BYTES
    params = full(json.dumps({"max_tokens": 4}))
    first = b.add(long_chat, params, 0)
    # Not rendered here: asked to add it again, and the render runs on its own thread.
    assert first.code == Added.READING
    assert any(t.name.startswith("pensieve-render") for t in threading.enumerate())
    steps, started, t0 = 0, None, time.monotonic()
    while started is None:
        assert time.monotonic() - t0 < 120, "the long prompt never started"
        for uid, _pieces, finish in b.step():
            assert uid == short and finish is None
            steps += 1
        r = b.add(long_chat, params, 0)
        if r.code == Added.STARTED:
            started = r
        else:
            assert r.code == Added.READING
    # The short generation kept decoding during the render (one token per step).
    assert steps >= 3, steps
    # The same tokens as rendering on this thread.
    assert started.input_tokens == len(engine.render(long_chat))
    b.cancel([short, started.uid])
    assert b._renderer.pending() == 0


def test_a_long_prompt_is_counted_off_the_batch_thread(engine):
    b = Batcher(engine, 4, 0)
    long_chat = chat(LONG + "count me")
    assert b.count_tokens(chat("hello")) == len(engine.render(chat("hello")))
    counts = [b.count_tokens(long_chat)]
    while counts[-1] == -1:
        time.sleep(0.01)
        counts.append(b.count_tokens(long_chat))
    assert counts[0] == -1 and counts[-1] == len(engine.render(long_chat))


def test_renders_nobody_claims_are_bounded():
    r = render.Renderer(lambda chat: [1, 2, 3])
    pad = "x" * render.OFF_THREAD_BYTES
    for i in range(render.MAX_JOBS + 5):
        assert r.render(chat(f"{i}{pad}")) is None
    assert r.pending() == render.MAX_JOBS
    r.close()
    assert r.pending() == 0


def test_a_render_error_is_raised_where_the_render_is_asked_for():
    def failing(chat):
        raise ValueError("this template cannot render it")

    r = render.Renderer(failing)
    bad = chat("bad" + "x" * render.OFF_THREAD_BYTES)
    assert r.render(bad) is None
    deadline = time.monotonic() + 10
    while True:
        assert time.monotonic() < deadline
        try:
            if r.render(bad) is not None:
                raise AssertionError("a failed render gave tokens")
        except ValueError as e:
            assert "cannot render" in str(e)
            break
        time.sleep(0.01)
    assert r.pending() == 0
    r.close()
