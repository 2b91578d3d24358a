"""mlx-lm's prompt batch, with each prompt's KV cache allocated once for the rest of its prompt.

mlx-lm's ``BatchKVCache`` grows 256 positions at a time, and every growth copies the whole
cache (a new buffer, then ``mx.concatenate``). Read in full 2,048-token chunks, a 6,500-token
prompt's cache was copied 4 times. Read in the step budget's chunks of a few tokens beside
decoding streams (:mod:`~pensieve_bridge.step_budget`), it was copied 25 times, and each copy
made a step of its own several times longer than the others: on the demo model, every 32nd
chunk of 8 tokens took 9-10 ms where the rest took 6, the longest gaps the decoding streams saw
while the prompt was read, apart from its arrival and its move into the decoding batch.

:class:`PromptBatch` replaces mlx-lm's ``PromptProcessingBatch`` in pensieve's
``BatchGenerator``. Before each step the batcher tells it how many tokens each prompt still has
to read (:attr:`PromptBatch.remaining`); when a chunk is about to grow the cache, the growth is
made large enough for the longest of them, so that the cache is allocated once. The cache is
the size it would have grown to anyway: the memory it holds is the same, only sooner. Once the
prompt is read, the cache moves into the generation batch with mlx-lm's growth again
(:func:`settle`).
"""

from __future__ import annotations

from mlx_lm.generate import PromptProcessingBatch
from mlx_lm.models.cache import BatchKVCache

#: mlx-lm's own growth step (``BatchKVCache.step``).
STEP = BatchKVCache.step


class PromptBatch(PromptProcessingBatch):
    """mlx-lm's prompt batch, growing its caches once for the rest of its prompts."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        #: Prompt tokens each sequence (by uid) has still to give the model, before this step.
        self.remaining: dict[int, int] = {}

    def prompt(self, tokens):
        if tokens:
            rest = max((self.remaining.get(uid, 0) for uid in self.uids), default=0)
            chunk = max(len(t) for t in tokens)
            for c in self.prompt_cache:
                if isinstance(c, BatchKVCache) and (c.keys is None or c._idx + chunk > c.keys.shape[2]):
                    # This chunk grows the cache: by the rest of the longest prompt at once.
                    c.step = max(STEP, -(-max(rest, chunk) // STEP) * STEP)
        super().prompt(tokens)


def settle(caches: list) -> None:
    """Caches that move from a :class:`PromptBatch` into the generation batch grow as mlx-lm's
    do again (256 positions at a time, as decoding needs them)."""
    for c in caches:
        if isinstance(c, BatchKVCache):
            c.__dict__.pop("step", None)
