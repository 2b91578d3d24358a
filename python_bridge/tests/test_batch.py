import json

import pytest
from conftest import add, full, reference_generate, running
from pensieve_bridge.batch import Batcher
from pensieve_bridge.protocol import Added, Finish

SYSTEM = "You are a helpful assistant who answers carefully. " * 40
GREEDY = json.dumps({"max_tokens": 24, "temperature": 0})


def chat(question):
    return json.dumps({"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]})


def run(batcher):
    out = {}
    finishes = {}
    while running(batcher):
        for uid, pieces, finish in batcher.step():
            out[uid] = out.get(uid, "") + "".join(p for _, p in pieces)
            if finish is not None:
                finishes[uid] = finish
    return out, finishes


def test_batched_greedy_answers_match_one_at_a_time(engine):
    alone = {}
    for q in ["hello", "what is a cache?", "again"]:
        ref = "".join(t for t, _ in reference_generate(engine, engine.render(chat(q)), GREEDY))
        alone[q] = ref
    b = Batcher(engine, 4, 0)
    uids = {add(b, chat(q), GREEDY)[0]: q for q in alone}
    out, finishes = run(b)
    for uid, q in uids.items():
        assert out[uid] == alone[q]
        assert finishes[uid] == Finish.LENGTH
    assert engine.clear_cache() == 0


def test_a_repeated_prefix_comes_from_the_prompt_cache_and_can_be_dropped(engine):
    b = Batcher(engine, 4, 64 << 20)
    uid, n, cached = add(b, chat("hello"), GREEDY)
    assert cached == 0
    first, _ = run(b)
    nbytes, entries = b.prompt_cache_stats()
    assert nbytes > 0 and entries == 1
    # Same system prompt, another question: the shared prefix is not processed again.
    uid2, n2, cached2 = add(b, chat("something else entirely"), GREEDY)
    assert 0.8 * n2 < cached2 < n2
    run(b)
    # The exact same prompt: all but the last token is cached, and greedy says the same.
    uid3, n3, cached3 = add(b, chat("hello"), GREEDY)
    assert cached3 == n3 - 1
    again, _ = run(b)
    assert again[uid3] == first[uid]
    b.drop_prompt_cache()
    assert b.prompt_cache_stats() == (0, 0)


def test_cancel_and_a_too_long_prompt(engine):
    b = Batcher(engine, 4, 0)
    assert b.add(chat("hello"), full(GREEDY), 10).code == Added.TOO_LONG
    assert running(b) == 0
    uid, _, _ = add(b, chat("hello"), json.dumps({"max_tokens": 1000, "temperature": 0}))
    b.step()
    b.cancel([uid])
    assert running(b) == 0
    assert b.step() == []
    assert engine.clear_cache() == 0


def test_a_cancelled_generation_leaves_its_prefix_in_the_prompt_cache(engine):
    b = Batcher(engine, 4, 64 << 20)
    uid, n, _ = add(b, chat("hello"), json.dumps({"max_tokens": 1000, "temperature": 0}))
    for _ in range(5):
        b.step()
    b.cancel([uid], keep=True)
    assert b.prompt_cache_stats()[1] == 1
    _, n2, cached = add(b, chat("hello"), GREEDY)
    assert cached == n2 - 1
    run(b)
    # Without keep (a failure), nothing is cached.
    b2 = Batcher(engine, 4, 64 << 20)
    uid, _, _ = add(b2, chat("hello"), GREEDY)
    b2.step()
    b2.cancel([uid])
    assert b2.prompt_cache_stats() == (0, 0)


def test_a_stop_sequence_stops_the_sequence_inside_the_batch_and_is_part_of_the_text(engine):
    b = Batcher(engine, 4, 0)
    uid, _, _ = add(b, chat("hello"), GREEDY)
    text, _ = run(b)
    words = text[uid].split()
    assert len(words) > 3, text
    stop = " " + words[2]
    # Given as a stop sequence, mlx-lm ends the generation where its tokens appear, and its
    # last token is in the text, so that Rust can see the whole sequence and name it.
    params = json.dumps({"max_tokens": 24, "temperature": 0, "stop": [stop]})
    uid, _, _ = add(b, chat("hello"), params)
    out, finishes = run(b)
    assert finishes[uid] == Finish.STOP
    assert out[uid].endswith(stop) and text[uid].startswith(out[uid]), (out[uid], text[uid])


@pytest.mark.parametrize("attention", ["numpy", "mlx"])
def test_a_step_over_the_memory_limit_stops_the_largest_generation_and_no_other(engine, attention, monkeypatch):
    import mlx.core as mx
    from pensieve_bridge import cpu_attention

    if attention == "mlx":  # the scores are MLX's memory, not numpy's (cpu_attention)
        monkeypatch.setattr(cpu_attention, "MIN_WORK", 1 << 62)
    b = Batcher(engine, 4, 0)
    idle = mx.get_active_memory()
    # A short prompt peaks at well under 1 MB over the weights; a 2,000-token prefill at about
    # 80 MB with MLX's attention (its scores and logits of a whole chunk), over 32 MB with
    # numpy's (a block of scores).
    b.set_memory_limit(idle + (16 << 20))
    short, _, _ = add(b, chat("hi"), json.dumps({"max_tokens": 40, "temperature": 0}))
    b.step()
    long_prompt = json.dumps({"messages": [{"role": "user", "content": "hello world " * 500}]})
    long, n, _ = add(b, long_prompt, json.dumps({"max_tokens": 8, "temperature": 0}))
    assert n > 1900
    out, finishes = run(b)
    assert finishes[long] == Finish.MEMORY
    assert "MLX went over its memory limit" in out[long], out[long]
    assert f"the largest running ({n} tokens)" in out[long], out[long]
    assert finishes[short] == Finish.LENGTH
    # The peak since start-up still shows the step that crossed the line.
    assert engine.memory()[2] > idle + (16 << 20)
    assert engine.clear_cache() == 0
    # Under the limit, the same batcher serves again.
    again, _, _ = add(b, chat("hi"), GREEDY)
    _, finishes = run(b)
    assert finishes[again] == Finish.LENGTH
    b.set_memory_limit(0)
