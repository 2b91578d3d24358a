"""Drafts from a small model: ``[models.X] draft = "Y"`` (:mod:`~pensieve_bridge.speculate`).

Prompt lookup drafts only what the prompt already holds. For free text, a small model with
the same tokenizer proposes the next few tokens, and the large one verifies them in one pass
as it verifies lookups. The draft model proposes its argmax (a certain draft), so the
verification rule of :func:`~pensieve_bridge.speculate.verify` keeps the large model's output
distribution, and at temperature 0 its exact text.

Each generation has a :class:`Drafter`: the draft model's own KV cache over the generation's
tokens, fed lazily (the tokens the batch appended since the last draft go in with the next
draft), and trimmed back to the tokens that were kept. A new generation's prompt is read by
the draft model in chunks of :data:`CATCH_UP` tokens, one chunk a step, without drafts until
it has caught up, so that a long prompt does not stall the batch. A step's drafts, one graph
per generation, are evaluated together.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

#: Prompt tokens the draft model reads for one generation in a step while catching up.
CATCH_UP = 512
#: The most tokens the draft model proposes in a step; the length adapts below it as lookup's
#: does (a refusal halves it toward what was kept).
MOST = 8
#: The length drafts start at.
FIRST = 4


class DraftError(ValueError):
    """The draft model cannot draft for this model; the message says why."""


def vocabulary(tokenizer) -> dict:
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    return hf.get_vocab() if hasattr(hf, "get_vocab") else {}


def check(target, draft) -> None:
    """Raises :class:`DraftError` unless ``draft`` (an Engine) can draft for ``target``: the
    same vocabulary (token text to id, special tokens included), the same end-of-sequence
    tokens, and a KV cache that can be trimmed."""
    ours, theirs = vocabulary(target.tokenizer), vocabulary(draft.tokenizer)
    if not ours or ours != theirs:
        differ = sum(1 for t, i in ours.items() if theirs.get(t) != i) + sum(1 for t in theirs if t not in ours)
        raise DraftError(
            f"its tokenizer is not the model's: {len(theirs)} tokens against {len(ours)}, {differ} differ "
            "(a draft model must share the model's tokenizer, as the smaller models of one family do)"
        )
    if set(target.tokenizer.eos_token_ids) != set(draft.tokenizer.eos_token_ids):
        raise DraftError(
            f"its end-of-sequence tokens {sorted(draft.tokenizer.eos_token_ids)} are not the model's "
            f"{sorted(target.tokenizer.eos_token_ids)}"
        )
    if not can_trim_prompt_cache(make_prompt_cache(draft.model)):
        raise DraftError("its KV cache cannot be trimmed (sliding-window or recurrent layers), which drafting needs")


class DraftModel:
    """A loaded draft model (an Engine checked by :func:`check`)."""

    def __init__(self, engine, target):
        check(target, engine)
        self.engine = engine
        self.model = engine.model
        self.kv_bytes_per_token = engine.kv_bytes_per_token

    def drafter(self, tokens: list[int]) -> "Drafter":
        return Drafter(self.model, tokens)


class Drafter:
    """The draft model's cache over one generation's tokens (the list mlx-lm appends to)."""

    def __init__(self, model, tokens: list[int]):
        self.model = model
        self.tokens = tokens
        self.cache = make_prompt_cache(model)
        #: Tokens of ``tokens`` in the cache.
        self.seen = 0
        #: Tokens in the cache after the last draft (``seen`` plus the draft's).
        self._fed = 0
        self.length = FIRST

    def propose(self, last: int, k: int) -> Optional[mx.array]:
        """Up to ``k`` tokens that follow ``tokens + [last]``, as a lazy array (evaluated with
        the batch's others); None while the prompt is still being read (one chunk is read)."""
        behind = len(self.tokens) - self.seen
        if behind > CATCH_UP:
            chunk = mx.array(self.tokens[self.seen : self.seen + CATCH_UP])[None]
            self.model(chunk, cache=self.cache)
            mx.eval([c.state for c in self.cache])
            self.seen += CATCH_UP
            self._fed = self.seen
            return None
        k = min(k, self.length)
        if k <= 0:
            return None
        x = mx.array(self.tokens[self.seen :] + [last])[None]
        out = []
        for _ in range(k):
            logits = self.model(x, cache=self.cache)
            y = mx.argmax(logits[:, -1, :], axis=-1)
            out.append(y)
            x = y[:, None]
        # The last proposed token is not fed: it is verified, and fed next time if kept.
        self._fed = len(self.tokens) + k
        return mx.concatenate(out)

    def kept(self, drafted: int, kept: int) -> None:
        """``kept`` of the ``drafted`` tokens it proposed (after ``last``) were kept: what the
        cache holds beyond them leaves it. Before the batch appends this step's tokens."""
        valid = len(self.tokens) + 1 + min(kept, drafted - 1)
        trim_prompt_cache(self.cache, self._fed - valid)
        self.seen = self._fed = valid
        if kept == drafted:
            self.length = min(MOST, self.length + 1)
        else:
            self.length = max(1, (self.length + kept + 1) // 2)
