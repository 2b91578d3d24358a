"""A draft model proposes tokens for generations whose prompt gives none: the text at
temperature 0 is the model's own, alone and in a batch, and a draft model with another
tokenizer is refused at load."""

from types import SimpleNamespace

import pytest
from conftest import generate
from pensieve_bridge import draft as drafting
from pensieve_bridge.engine import Engine


@pytest.fixture(scope="module")
def drafter_engine():
    """The demo model loaded a second time: it drafts for itself, so its drafts are nearly all
    kept, and any token that is not verified would show as a different text."""
    return Engine("demo")


PROMPTS = ["Tell me about memory.", "hi", "Write a story about a cat " * 3]


def test_drafts_from_a_draft_model_keep_the_text_alone_and_in_a_batch(engine, drafter_engine):
    model = drafting.DraftModel(drafter_engine, engine)
    plain, _, off = generate(engine, PROMPTS[:1], 0, max_tokens=60)
    fast, tokens, on = generate(engine, PROMPTS[:1], 0, model, max_tokens=60)
    assert fast == plain
    assert off[1] == 0
    steps, drafted, accepted, sequence_steps, total = on
    assert steps > 0 and drafted > 0 and total == tokens[0] == 60, on
    # The model drafting for itself: most drafts are kept, so far fewer steps than tokens.
    assert accepted >= drafted // 2 and sequence_steps < total // 2, on
    # Three generations, which keep different numbers of tokens a step.
    plain, _, _ = generate(engine, PROMPTS, 0, max_tokens=60)
    fast, _, on = generate(engine, PROMPTS, 0, model, max_tokens=60)
    assert fast == plain
    assert on[1] > 0
    # With lookup on too: lookups first, the draft model where they find nothing.
    both, _, _ = generate(engine, PROMPTS, 10, model, max_tokens=60)
    assert both == plain


def test_a_long_prompt_is_read_by_the_draft_model_a_chunk_a_step(engine, drafter_engine):
    model = drafting.DraftModel(drafter_engine, engine)
    long = " ".join(f"word{i}" for i in range(700))
    plain, _, _ = generate(engine, [long], 0, max_tokens=20)
    fast, _, on = generate(engine, [long], 0, model, max_tokens=20)
    assert fast == plain
    assert on[1] > 0, on  # it caught up, then drafted


def test_sampling_through_a_draft_model_runs_to_max_tokens(engine, drafter_engine):
    model = drafting.DraftModel(drafter_engine, engine)
    texts, tokens, stats = generate(engine, PROMPTS[:2], 0, model, temperature=1.0, max_tokens=80)
    assert tokens == [80, 80] and all(texts)
    assert stats[1] > 0 and stats[4] == 160, stats


def test_a_draft_model_with_another_tokenizer_is_refused(engine):
    vocab = dict(engine.tokenizer._tokenizer.get_vocab()) if hasattr(engine.tokenizer, "_tokenizer") else dict(engine.tokenizer.get_vocab())
    other = dict(vocab)
    a, b = list(other)[:2]
    other[a], other[b] = other[b], other[a]
    fake = SimpleNamespace(tokenizer=SimpleNamespace(get_vocab=lambda: other, eos_token_ids=engine.tokenizer.eos_token_ids))
    with pytest.raises(drafting.DraftError, match=r"tokenizer is not the model's: .* 2 differ"):
        drafting.check(engine, fake)
