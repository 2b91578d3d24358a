import json

from pensieve_bridge.batch import Batcher

SYSTEM = "You are a helpful assistant who answers carefully. " * 40
GREEDY = json.dumps({"max_tokens": 24, "temperature": 0})


def chat(question):
    return json.dumps({"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]})


def run(batcher):
    out = {}
    finishes = {}
    while batcher.running():
        for uid, pieces, finish in batcher.step():
            out[uid] = out.get(uid, "") + "".join(p for _, p in pieces)
            if finish:
                finishes[uid] = finish
    return out, finishes


def test_batched_greedy_answers_match_one_at_a_time(engine):
    alone = {}
    for q in ["hello", "what is a cache?", "again"]:
        ref = "".join(t for t, _ in engine.generate(engine.render(chat(q)), GREEDY))
        alone[q] = ref
    b = Batcher(engine, 4, 0)
    uids = {b.add(chat(q), GREEDY, 0)[0]: q for q in alone}
    out, finishes = run(b)
    for uid, q in uids.items():
        assert out[uid] == alone[q]
        assert finishes[uid] == "length"
    assert engine.clear_cache() == 0


def test_a_repeated_prefix_comes_from_the_prompt_cache_and_can_be_dropped(engine):
    b = Batcher(engine, 4, 64 << 20)
    uid, n, cached = b.add(chat("hello"), GREEDY, 0)
    assert cached == 0
    first, _ = run(b)
    nbytes, entries = b.prompt_cache_stats()
    assert nbytes > 0 and entries == 1
    # Same system prompt, another question: the shared prefix is not processed again.
    uid2, n2, cached2 = b.add(chat("something else entirely"), GREEDY, 0)
    assert 0.8 * n2 < cached2 < n2
    run(b)
    # The exact same prompt: all but the last token is cached, and greedy says the same.
    uid3, n3, cached3 = b.add(chat("hello"), GREEDY, 0)
    assert cached3 == n3 - 1
    again, _ = run(b)
    assert again[uid3] == first[uid]
    b.drop_prompt_cache()
    assert b.prompt_cache_stats() == (0, 0)


def test_cancel_and_a_too_long_prompt(engine):
    b = Batcher(engine, 4, 0)
    assert b.add(chat("hello"), GREEDY, 10)[0] == -1
    assert b.running() == 0
    uid, _, _ = b.add(chat("hello"), json.dumps({"max_tokens": 1000, "temperature": 0}), 0)
    b.step()
    b.cancel([uid])
    assert b.running() == 0
    assert b.step() == []
    assert engine.clear_cache() == 0


def test_a_cancelled_generation_leaves_its_prefix_in_the_prompt_cache(engine):
    b = Batcher(engine, 4, 64 << 20)
    uid, n, _ = b.add(chat("hello"), json.dumps({"max_tokens": 1000, "temperature": 0}), 0)
    for _ in range(5):
        b.step()
    b.cancel([uid], keep=True)
    assert b.prompt_cache_stats()[1] == 1
    _, n2, cached = b.add(chat("hello"), GREEDY, 0)
    assert cached == n2 - 1
    run(b)
    # Without keep (a failure), nothing is cached.
    b2 = Batcher(engine, 4, 64 << 20)
    uid, _, _ = b2.add(chat("hello"), GREEDY, 0)
    b2.step()
    b2.cancel([uid])
    assert b2.prompt_cache_stats() == (0, 0)
