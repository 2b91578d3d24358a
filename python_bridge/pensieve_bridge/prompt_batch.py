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

That move is the longest step a decoding stream sees while a long prompt is read, and most of
it was copies into fresh memory, whose cost here is mostly page faults (a 6,500-token prompt
of the demo model: ~4,000 faults, ~9 ms). mlx-lm copies the prompt's cache three times on the
way: the split off the prompt batch gathers its rows into a new buffer, even when it takes
every row; then ``BatchKVCache.extend`` pads each side into a new buffer and concatenates the
two into a third. Here the split takes the caches as they are when it takes the whole batch
(the usual case: one prompt at a time), and :func:`merge` writes both sides into one new
buffer, padded as mlx-lm pads them. Timed in process on the demo model (a stream decoding, a
6,500-token prompt moving in, 3 runs each): that step went from 19-25 ms to 9.5-10.3 ms.
"""

from __future__ import annotations

import mlx.core as mx
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

    def split(self, indices):
        if sorted(indices) != list(range(len(self.uids))):
            return super().split(indices)
        # Every prompt moves on: the new batch takes the caches as they are (mlx-lm's copies
        # them, then gathers each row into a new buffer).
        moved = self.__class__.__new__(self.__class__)
        moved.__dict__.update(self.__dict__)
        moved.remaining = dict(self.remaining)
        for name in ("uids", "prompt_cache", "tokens", "samplers", "logits_processors", "max_tokens", "stop_sequences"):
            setattr(self, name, [])
        return moved


def settle(caches: list) -> None:
    """Caches that move from a :class:`PromptBatch` into the generation batch grow as mlx-lm's
    do again (256 positions at a time, as decoding needs them)."""
    for c in caches:
        if isinstance(c, BatchKVCache):
            c.__dict__.pop("step", None)


def merge(into: list, caches: list) -> None:
    """Appends the sequences of ``caches`` (a batch's, one per layer) to ``into``'s, in place: what
    mlx-lm's ``BatchKVCache.extend`` gives (the same arrays, padding and offsets), written into
    one new buffer per array (mlx-lm pads each side into a buffer of its own, then concatenates
    them into a third). Caches of other kinds are extended as mlx-lm does."""
    for a, b in zip(into, caches):
        if not (type(a) is BatchKVCache and type(b) is BatchKVCache and a.keys is not None and b.keys is not None):
            a.extend(b)
            continue
        top = max(a._idx, b._idx)
        size = max(a.keys.shape[2], b.keys.shape[2])
        rows_a, rows_b = a.keys.shape[0], b.keys.shape[0]
        sides = [(a, top - a._idx), (b, top - b._idx)]
        for name in ("keys", "values"):
            first = getattr(a, name)
            out = mx.zeros((rows_a + rows_b, first.shape[1], size, first.shape[3]), first.dtype)
            start = 0
            for c, left in sides:
                x = getattr(c, name)
                # Right-justified at ``top``; what lies beyond the buffer's end is growth room.
                x = x[..., : size - left, :]
                out[start : start + x.shape[0], :, left : left + x.shape[2]] = x
                start += x.shape[0]
            setattr(a, name, out)
        a.offset = mx.concatenate([a.offset, b.offset])
        a.left_padding = mx.concatenate([a.left_padding + (top - a._idx), b.left_padding + (top - b._idx)])
        a._idx = top
