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

What was left of it was still mostly page faults: the one new buffer is fresh memory. So the
buffers are made ahead (:meth:`PromptBatch.reserve`): in the last steps of the prompt, one or a
few a step, each the shape the move will need and already written (zeros), held by the
prompt's cache; :func:`merge` writes into them in place when their shape is still the one it
needs, and makes new ones otherwise. The memory is the move's own, held a few steps sooner.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.generate import PromptProcessingBatch
from mlx_lm.models.cache import BatchKVCache

#: mlx-lm's own growth step (``BatchKVCache.step``).
STEP = BatchKVCache.step
#: :meth:`PromptBatch.reserve` makes its buffers over this many steps before the move at the
#: latest (the estimate of steps left is the prompt's tokens left over this step's chunk, and
#: chunks may grow).
AHEAD = 2


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

    def reserve(self, generation, steps_left: int) -> int:
        """Makes, ahead of the move into ``generation`` (the decoding batch), the buffers
        :func:`merge` will write into, when one prompt is read and ``steps_left`` steps remain
        (estimated): as many this step as spreads the rest over the steps left. A reservation
        whose shape no longer fits (the decoding batch changed) is made again. Returns how many
        buffers it made."""
        if len(self.uids) != 1 or not len(generation) or steps_left < 0:
            return 0
        if steps_left - AHEAD > 2 * len(self.prompt_cache):
            return 0  # more steps left than buffers (two a layer) could ever be to make
        todo = []
        for a, b in zip(generation.prompt_cache, self.prompt_cache):
            if not _mergeable(a, b):
                return 0
            for name in ("keys", "values"):
                shape, dtype = _merged(a, b, name)
                have = b.__dict__.get("reserved", {}).get(name)
                if have is None or tuple(have.shape) != shape or have.dtype != dtype:
                    todo.append((b, name, shape, dtype))
        if not todo or len(todo) < steps_left - AHEAD:
            return 0
        made = todo[: -(-len(todo) // max(1, steps_left - AHEAD + 1))]
        for b, name, shape, dtype in made:
            buffer = mx.zeros(shape, dtype)
            mx.eval(buffer)  # written now: its pages are this step's, not the move's
            b.__dict__.setdefault("reserved", {})[name] = buffer
        return len(made)


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
    them into a third), or into the buffers :meth:`PromptBatch.reserve` made for it when they
    fit. Caches of other kinds are extended as mlx-lm does."""
    for a, b in zip(into, caches):
        reserved = b.__dict__.pop("reserved", {})
        if not _mergeable(a, b):
            a.extend(b)
            continue
        top = max(a._idx, b._idx)
        sides = [(a, top - a._idx), (b, top - b._idx)]
        for name in ("keys", "values"):
            shape, dtype = _merged(a, b, name)
            size = shape[2]
            out = reserved.pop(name, None)
            if out is None or tuple(out.shape) != shape or out.dtype != dtype:
                out = mx.zeros(shape, dtype)
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


def _mergeable(a, b) -> bool:
    """Whether :func:`merge` writes these two caches itself (else mlx-lm's ``extend`` does)."""
    return type(a) is BatchKVCache and type(b) is BatchKVCache and a.keys is not None and b.keys is not None


def _merged(a, b, name: str) -> tuple[tuple, object]:
    """The shape and dtype of ``name`` (keys or values) once ``b`` is merged into ``a``."""
    x, y = getattr(a, name), getattr(b, name)
    return (x.shape[0] + y.shape[0], x.shape[1], max(x.shape[2], y.shape[2]), x.shape[3]), x.dtype
