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

Buffers made ahead are written on a stream of their own (:data:`SIDE`): on a CPU, by a thread
of their own, while the decoding streams' steps go on, a layer's buffers a step. The prompt's
own cache is made ahead the same way while streams decode: its first chunk grows it by
mlx-lm's step (256 positions, a few pages), and the buffer for the rest of the prompt is made on
:data:`SIDE` meanwhile, to take the cache at its next growth (a copy of the positions read so
far). Made at once for the whole prompt in its first chunk, on the decoding streams' stream, it
made that step the longest a decoding stream saw (1,600 faults, 15 ms against 5 ms steps; a
fault costs ~3 us here). And a decoding batch's caches, which mlx-lm grows 256 positions at a
time by a copy into a new buffer (at a 6,500-token context on the demo model, the step that
grew took 14 ms against a 4 ms median, ~2,800 faults of it), grow into buffers made ahead the
same way (:func:`grow_ahead`): the copy is left, the faults are :data:`SIDE`'s. On this 2-core
machine the step that makes a buffer ahead still takes longer (~9 ms in that case: the faults'
kernel work is not free for the other core), but less than the growth did.
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
AHEAD = 3
#: The stream buffers made ahead are written on (one per thread, as mlx-lm's own
#: ``generation_stream``): not the decoding streams' own, so that they are written beside it.
SIDE = mx.new_thread_local_stream(mx.default_device())
#: A decoding batch's cache has its next growth made ahead once this many positions or fewer
#: are left (:func:`grow_ahead`): steps enough for :data:`SIDE` to write it first.
GROW_AHEAD = 64


class PromptBatch(PromptProcessingBatch):
    """mlx-lm's prompt batch, growing its caches once for the rest of its prompts."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        #: Prompt tokens each sequence (by uid) has still to give the model, before this step.
        self.remaining: dict[int, int] = {}
        #: Whether generations decode beside this step's prompts (the batcher sets it): the
        #: cache for the rest of a prompt is then made ahead, on :data:`SIDE`.
        self.decoding = False

    def prompt(self, tokens):
        if not tokens:
            return super().prompt(tokens)
        rest = max((self.remaining.get(uid, 0) for uid in self.uids), default=0)
        chunk = max(len(t) for t in tokens)
        caches = [c for c in self.prompt_cache if isinstance(c, BatchKVCache)]
        for c in caches:
            if c.keys is not None and c._idx + chunk <= c.keys.shape[2]:
                continue
            if _take_ahead(c, chunk):
                continue
            # This chunk grows the cache: by the rest of the longest prompt at once, or while
            # streams decode by mlx-lm's step, the rest being made ahead (below).
            c.step = STEP if self.decoding else max(STEP, -(-max(rest, chunk) // STEP) * STEP)
        super().prompt(tokens)
        if self.decoding and caches and caches[0].keys is not None:
            # Over the steps until the cache is full (at least one chunk each), from this one.
            room = caches[0].keys.shape[2] - caches[0]._idx
            _spread_ahead(caches, rest - chunk, room // max(1, chunk))

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
        (estimated), on :data:`SIDE`: as many this step as spreads them over the steps left
        until the last :data:`AHEAD`. A reservation whose shape no longer fits (the decoding
        batch changed) is made again. Returns how many buffers it made."""
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
        made = _this_step(todo, steps_left - AHEAD + 1)
        for b, name, shape, dtype in made:
            b.__dict__.setdefault("reserved", {})[name] = _written(shape, dtype)
        return len(made)


def _this_step(todo: list, steps: int) -> list:
    """The first of ``todo`` to make this step, to spread them over ``steps`` steps."""
    return todo[: -(-len(todo) // max(1, steps))]


def _written(shape, dtype):
    """A buffer of zeros, being written on :data:`SIDE` (its pages are that thread's faults,
    not the next step's)."""
    buffer = mx.zeros(shape, dtype, stream=SIDE)
    mx.async_eval(buffer)
    return buffer


def grow_ahead(caches: list, most: int) -> None:
    """Before a decoding step that adds at most ``most`` positions to each of ``caches`` (a
    decoding batch's): grows the caches that need it into the buffers made ahead for them, and
    makes their next growth (mlx-lm's step, 256 positions) ahead, on :data:`SIDE`, spread over
    the steps from :data:`GROW_AHEAD` positions left. mlx-lm's growth is the same copy, into new
    buffers whose pages fault in the step that grows."""
    first = next((c for c in caches if type(c) is BatchKVCache and c.keys is not None), None)
    if first is None:
        return
    room = first.keys.shape[2] - first._idx  # the same for every layer: they grow together
    if room > GROW_AHEAD and room >= most:
        return  # most steps: nothing to make or take
    kv = [c for c in caches if type(c) is BatchKVCache and c.keys is not None]
    if room < most:
        for c in kv:
            _take_ahead(c, most)
    elif room <= GROW_AHEAD:
        _spread_ahead(kv, room + STEP, room - most + 1)


def _spread_ahead(caches: list, left: int, steps: int) -> None:
    """Makes ahead (:func:`_make_ahead`) the buffers of as many of ``caches`` as spreads those
    still to make over ``steps`` steps: one layer's page faults a step, not every layer's."""
    todo = [c for c in caches if c._idx + left > c.keys.shape[2] and not _fits(c, c.__dict__.get("ahead"), c._idx + left)]
    for c in _this_step(todo, steps):
        _make_ahead(c, left)


def _make_ahead(c, left: int) -> None:
    """Makes, on :data:`SIDE`, the buffers cache ``c`` will need for ``left`` more positions
    (:func:`_spread_ahead` chose it: it has no room for them, nor buffers made for them)."""
    size = -(-(c._idx + left) // STEP) * STEP
    c.ahead = tuple(_written((*x.shape[:2], size, x.shape[3]), x.dtype) for x in (c.keys, c.values))


def _fits(c, ahead, need: int) -> bool:
    """Whether buffers made ahead (keys, values) fit cache ``c`` grown to ``need`` positions."""
    return ahead is not None and all(
        new.shape[:2] == old.shape[:2] and new.shape[3] == old.shape[3] and new.dtype == old.dtype and new.shape[2] >= need
        for old, new in zip((c.keys, c.values), ahead)
    )


def _take_ahead(c, chunk: int) -> bool:
    """Grows cache ``c`` for ``chunk`` more positions into the buffers :func:`_make_ahead` made
    for it, when they fit (copying the positions it holds); returns whether it did."""
    ahead = c.__dict__.pop("ahead", None)
    if c.keys is None or not _fits(c, ahead, c._idx + chunk):
        return False
    keys, values = ahead
    del ahead
    keys[..., : c._idx, :] = c.keys[..., : c._idx, :]
    values[..., : c._idx, :] = c.values[..., : c._idx, :]
    c.keys, c.values = keys, values
    return True


def settle(caches: list) -> None:
    """Caches that move from a :class:`PromptBatch` into the generation batch, or of a
    decoding batch whose sequences changed, grow as mlx-lm's do again (256 positions at a time,
    as decoding needs them: :func:`grow_ahead`), and hold no buffer made ahead for their old
    shape."""
    for c in caches:
        if isinstance(c, BatchKVCache):
            c.__dict__.pop("step", None)
            c.__dict__.pop("ahead", None)  # made for a shape the batch no longer has


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
