"""Speculative decoding from the prompt: drafts from the sequence's own tokens, the rejection
rule that keeps the model's distribution (a statistical test on a toy model), and identical
output with and without it on the real demo model, alone and in a batch."""

import itertools
import json

import numpy as np
from conftest import add, generate, reference_generate
from pensieve_bridge.batch import Batcher
from pensieve_bridge.speculate import CATCH_UP, Lookup, Pace, verify


def test_a_draft_is_what_followed_the_latest_earlier_occurrence_of_the_last_tokens():
    tokens = [1, 2, 3, 4, 5, 9, 1, 2, 3, 7, 8, 0, 2]
    lookup = Lookup(tokens, 10)
    # ... 0, 2 then 3: the trigram (0, 2, 3) never occurred; the bigram (2, 3) did, latest at
    # 7-8, followed by 7, 8, 0, 2, and then the draft's own continuation (3 7 8 …).
    assert lookup.draft(3, 4) == [7, 8, 0, 2]
    assert lookup.draft(3, 7) == [7, 8, 0, 2, 3, 7, 8]
    assert lookup.draft(6, 4) == []  # (2, 6) never occurred
    assert lookup.draft(3, 0) == []
    # Tokens appended by mlx-lm (the same list) are indexed on the next draft.
    tokens += [3, 7, 8]
    assert lookup.draft(0, 3) == [2, 3, 7]
    assert lookup.likely()  # (7, 8) occurred before
    tokens.append(42)
    assert not lookup.likely()


def test_a_long_prompt_is_indexed_newest_first_a_few_hundred_positions_a_step():
    # 100, 101 early in a long prompt (then 6) and again near its end (then 7); 200, 201 only
    # early. Each step indexes CATCH_UP more positions, newest first.
    filler = [1000 + i for i in range(4 * CATCH_UP)]
    tokens = [5, 100, 101, 6, 200, 201, 202] + filler + [100, 101, 7] + filler[:10] + [200]
    lookup = Lookup(tokens, 10)
    assert lookup.draft(201, 2) == []  # the first step indexed only the newest positions
    steps = 2  # each draft is a step's catching up
    while lookup.draft(201, 2) == []:
        steps += 1
        assert steps <= len(tokens) // CATCH_UP + 1, steps
    # The first step indexes its CATCH_UP newest positions and CATCH_UP older ones.
    assert steps >= len(tokens) // CATCH_UP - 1, steps
    assert lookup.draft(201, 2) == [202, 1000]
    # New tokens are indexed at once; the older occurrence of (100, 101) did not replace the
    # latest one.
    tokens += [300, 100]
    assert lookup.draft(101, 2) == [7, 1000]


def test_the_draft_length_grows_while_drafts_are_kept_and_shrinks_when_not():
    lookup = Lookup([], 10)
    assert lookup.length == 10
    lookup.learn(10, 2)
    assert lookup.length == 6
    lookup.learn(6, 6)
    assert lookup.length == 8
    for _ in range(5):
        lookup.learn(8, 0)
    assert lookup.length == 1


# A toy model: a Markov chain over five tokens; its distribution of 3-token continuations
# is known exactly.
V = 5
CHAIN = np.random.default_rng(7).dirichlet(np.ones(V) * 0.7, size=V)


def sample_plain(rng, start, n):
    out, prev = [], start
    for _ in range(n):
        prev = int(rng.choice(V, p=CHAIN[prev]))
        out.append(prev)
    return tuple(out)


def sample_speculative(rng, start, n, accept_rule):
    """Draws `n` tokens as the batch does: a draft (here a fixed, mostly wrong guess) verified
    against the model's distribution at each draft position."""
    out, prev = [], start
    while len(out) < n:
        draft = [2, 2, 1][: n - len(out) - 1]
        # The model's distribution after prev, then after each draft token.
        rows = [CHAIN[prev]] + [CHAIN[d] for d in draft]
        kept, following = accept_rule(np.array(rows), draft, rng)
        out += draft[:kept] + [following]
        prev = out[-1]
    return tuple(out[:n])


def chi_square(samples, start):
    counts = {}
    for s in samples:
        counts[s] = counts.get(s, 0) + 1
    total, chi2 = len(samples), 0.0
    for seq in itertools.product(range(V), repeat=3):
        p, prev = 1.0, start
        for t in seq:
            p *= CHAIN[prev][t]
            prev = t
        expected = total * p
        if expected > 0:
            chi2 += (counts.get(seq, 0) - expected) ** 2 / expected
    return chi2


def test_sampling_with_speculation_keeps_the_models_distribution():
    rng = np.random.default_rng(2026)
    n = 20_000
    # 124 degrees of freedom: chi-square exceeds 175 with probability 0.2%.
    bound = 175
    plain = chi_square([sample_plain(rng, 0, 3) for _ in range(n)], 0)
    speculative = chi_square([sample_speculative(rng, 0, 3, verify) for _ in range(n)], 0)
    print(f"chi-square: plain {plain:.1f}, speculative {speculative:.1f} (bound {bound})")
    assert plain < bound
    assert speculative < bound

    # The test can fail: keeping every draft token (no rejection) changes the distribution.
    def keep_all(rows, draft, rng):
        return len(draft), int(rng.choice(V, p=rows[len(draft)]))

    wrong = chi_square([sample_speculative(rng, 0, 3, keep_all) for _ in range(n)], 0)
    assert wrong > 10 * bound, wrong


CODE = "\n".join(f"def f{i}(x):\n    return x * {i} + {i % 3}" for i in range(30))
PROMPTS = [f"Copy this code:\n{CODE}\nNow copy it again.", "Hello there", f"{CODE[:400]} and again {CODE[:400]}"]


def test_output_at_temperature_zero_is_the_same_with_and_without_speculation(engine):
    plain, _, off = generate(engine, PROMPTS[:1], 0)
    fast, tokens, on = generate(engine, PROMPTS[:1], 10)
    assert fast == plain
    assert off[0] == 0 and on[0] > 0, (off, on)  # steps that verified drafts
    steps, drafted, accepted, sequence_steps, total = on
    assert total == tokens[0] and accepted > 0 and sequence_steps < total, on
    # In a batch, where sequences keep different numbers of draft tokens each step.
    plain, _, _ = generate(engine, PROMPTS, 0)
    fast, _, on = generate(engine, PROMPTS, 10)
    assert fast == plain
    assert on[0] > 0


def test_sampling_runs_through_speculation_on_the_real_model(engine):
    texts, tokens, stats = generate(engine, PROMPTS[:1], 10, temperature=1.0, max_tokens=200)
    assert tokens[0] == 200 and texts[0]
    assert stats[0] > 0 and stats[4] == 200, stats


def test_one_sequence_decodes_without_a_mask_and_gives_the_same_text(engine):
    """The mask is left out only while the batch holds one sequence: a second joining (with
    left padding) brings it back, and the first's text is still what it is alone."""
    b = Batcher(engine, 4, 0)
    chat = json.dumps({"messages": [{"role": "user", "content": "Tell me about memory."}]})
    params = json.dumps({"max_tokens": 120, "temperature": 0})
    reference = "".join(t for t, _ in reference_generate(engine, engine.render(chat), params))

    def marks():
        return {c.unmasked for c in b._gen._generation_batch.prompt_cache}

    first, _, _ = add(b, chat, params)
    text, seen = {}, []
    while len(text.get(first, "")) < 20:
        for s in b.step():
            text[s.uid] = text.get(s.uid, "") + "".join(o.payload for o in s.pieces)
    seen.append(marks())
    second, _, _ = add(b, json.dumps({"messages": [{"role": "user", "content": "hi"}]}), json.dumps({"max_tokens": 8}))
    done = set()
    while first not in done:
        for s in b.step():
            text[s.uid] = text.get(s.uid, "") + "".join(o.payload for o in s.pieces)
            if s.finish is not None:
                done.add(s.uid)
        if second in text and second not in done and len(seen) == 1:
            seen.append(marks())
        if second in done and len(seen) == 2:
            seen.append(marks())
    assert seen == [{True}, {False}, {True}]
    assert text[first] == reference


def test_a_batch_size_where_speculating_was_slower_speculates_only_to_probe():
    pace = Pace()
    assert pace.worth_it(8)  # nothing measured yet
    pace.record(8, True, 12, 0.006)  # 2,000 tokens/s speculating
    assert not pace.worth_it(8)  # a plain step, to compare with (a draft model always drafts)
    pace.record(8, False, 8, 0.002)  # 4,000 tokens/s plain
    decisions = [pace.worth_it(8) for _ in range(32)]
    assert decisions.count(True) == 2 and decisions[15] and decisions[31], decisions
    assert pace.worth_it(1)  # another batch size is measured on its own
    # Drafts that pay (an edit turn): a probe that was faster brings speculation back.
    for _ in range(3):
        pace.record(8, True, 40, 0.006)
    assert all(pace.worth_it(8) for _ in range(5))
