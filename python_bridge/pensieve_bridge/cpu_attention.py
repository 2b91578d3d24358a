"""Attention over a long context on a CPU, computed by numpy instead of MLX.

MLX's CPU ``exp`` is scalar on x86-64 (``simd::exp<float, 1>``, and each of its multiply-adds a
call to libm's ``fmaf``): about 12 ns an element here. Attention's softmax is that ``exp`` over
every position of the context, for every query and head, and MLX's CPU attention writes the
scores, their exponentials and the weights as separate arrays: one layer of the demo model, 8
queries over 6,500 positions, took 3.0 ms in ``mx.fast.scaled_dot_product_attention``. That made
every step that reads a long prompt, or decodes beside one, several times a short decoding step
(BENCHMARKS.md: the step budget), and a long prompt's full chunks slow to read. (The softmax in
base 2, ``mx.power(2, s - max)``, was this module's first answer: 1.7 times faster.)

:func:`attention` evaluates the queries, keys and values, reads their buffers in place with
numpy (the keys and values are views of the cache's), and computes the same attention there: the
scores by one matrix product, the softmax in place with numpy's vectorised ``exp`` (~2 ns an
element here), the weighted sum by another, the division last. Equal to MLX's within float32
rounding (1e-7 for heads of 16, 1e-6 for heads of 64). A long prompt's chunk is computed in
blocks of queries, at most :data:`BLOCK_BYTES` of scores at once; MLX's memory counters do not
see them, :data:`peak` does (the memory limit reads it: ``Engine.step_peak``).

:func:`install` puts it in place of ``mx.fast.scaled_dot_product_attention`` on a CPU, where
mlx-lm's models call it; it serves the cases where it is the same computation (float32, no
attention sinks, no mask or a causal or boolean one) over enough work, :data:`MIN_WORK`, and
hands every other call to MLX's own. The evaluation it needs ends MLX's lazy graph at each
layer: below ``MIN_WORK`` that costs more than it saves.

Measured on one layer here, ``mx.fast`` / base 2 / this, in ms (4 heads of 16; 9 query heads on
3 KV heads of 64, SmolLM2's shape):

| queries × positions | 1 × 2,048 | 1 × 8,700 | 8 × 8,700 | 64 × 8,700 | 2,048 × 2,048 |
|---|---|---|---|---|---|
| 4 heads of 16 | 0.32 / 0.31 / 0.13 | 1.01 / 0.98 / 0.22 | 5.76 / 3.74 / 1.24 | 37.0 / 22.1 / 6.2 | 303 / 369 / 168 |
| 9 on 3 heads of 64 | 1.10 / 0.69 / 0.39 | 3.61 / 2.14 / 1.11 | 15.9 / 9.2 / 4.3 | 89 / 88 / 25 | 762 / 912 / 333 |

In a model, through mlx-lm's ``generate_step`` (BENCHMARKS.md, fifth pass): SmolLM2 reads a
6,000-token prompt in 55 s instead of 148 in base 2 (which left full chunks to MLX). Decoding at
that context gains little (8 tokens/s either way): one query's attention was cheap in base 2
already, and each layer's evaluation costs about what numpy saves.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

#: Scores computed at once, at most (a long prompt's full chunk is computed in blocks of queries).
BLOCK_BYTES = 32 << 20
#: Calls with fewer queries × positions than this go to MLX's own attention, which is the faster
#: in a model where the evaluation this module needs costs more than ``exp`` (decoding the demo
#: model through ``generate_step``: 667 against 500 tokens/s at 512 positions, 541 against 501
#: at 1,024, 420 against 470 at 2,048).
MIN_WORK = 2048
#: The most that MLX held and this module's arrays took at once since :func:`reset_peak`, in
#: bytes: MLX's own peak does not see numpy's memory (the engine's step peak reads both).
peak = 0
#: What a masked position scores: finite, so that a row with every position masked (a padding
#: query) gives finite values, as MLX's own attention does, not NaN.
MASKED = float(mx.finfo(mx.float32).min)

_mlx = mx.fast.scaled_dot_product_attention


def attention(q, k, v, *, scale, mask=None, sinks=None, **kwargs):
    """``mx.fast.scaled_dot_product_attention`` (same arguments and result), computed by numpy
    when that is the same computation (see the module docs)."""
    b, heads, n, d = q.shape
    kv_heads, length = k.shape[1], k.shape[2]
    rep = heads // kv_heads
    # The cheap checks first: most calls (a short context) go to MLX before the mask is looked at.
    served = not (sinks is not None or kwargs or q.dtype != mx.float32 or k.dtype != mx.float32)
    if not (served and MIN_WORK <= n * length) or not _served_mask(mask, heads, n, length):
        return _mlx(q, k, v, scale=scale, mask=mask, sinks=sinks, **kwargs)
    arrays = (q, k, v, mask) if isinstance(mask, mx.array) else (q, k, v)
    mx.eval(*arrays)  # numpy reads MLX's buffers in place (k and v: views of the cache's)
    # Query heads that share a KV head side by side: (b, kv_heads, rep, n, d).
    queries = np.asarray(q).reshape(b, kv_heads, rep, n, d)
    keys, values = np.asarray(k).swapaxes(-1, -2), np.asarray(v)
    causal = isinstance(mask, str)  # "causal", the one name served
    hidden = _hidden(np.asarray(mask), kv_heads, rep) if isinstance(mask, mx.array) else None
    out = np.empty((b, kv_heads, rep, n, values.shape[-1]), dtype=np.float32)
    per_block = max(1, BLOCK_BYTES // (4 * b * heads * length))
    global peak
    peak = max(peak, mx.get_active_memory() + out.nbytes + 4 * b * heads * min(n, per_block) * length)
    for first in range(0, n, per_block):
        last = min(n, first + per_block)
        m = last - first
        scores = np.matmul((queries[:, :, :, first:last] * np.float32(scale)).reshape(b, kv_heads, rep * m, d), keys)
        grid = scores.reshape(b, kv_heads, rep, m, length)
        if causal:  # query i sees the context and the chunk's first i + 1
            tail = grid[..., length - n + first :]
            tail[..., np.triu(np.ones((m, n - first), dtype=bool), 1)] = MASKED
        elif hidden is not None:
            _hide(grid, hidden[..., first:last, :])
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        block = np.matmul(scores, values)
        block /= scores.sum(axis=-1, keepdims=True)
        out[:, :, :, first:last] = block.reshape(b, kv_heads, rep, m, -1)
    return mx.array(out.reshape(b, heads, n, values.shape[-1]))


def _served_mask(mask, heads, n, length) -> bool:
    """Whether this module computes attention with ``mask`` (None, causal, or booleans of shape
    ``(n, length)`` or ``(batch, 1 or heads, n, length)``)."""
    if mask is None:
        return True
    if isinstance(mask, str):
        return mask == "causal" and length >= n
    if not isinstance(mask, mx.array) or mask.dtype != mx.bool_ or tuple(mask.shape[-2:]) != (n, length):
        return False
    return mask.ndim == 2 or (mask.ndim == 4 and mask.shape[1] in (1, heads))


def _hidden(mask: np.ndarray, kv_heads: int, rep: int) -> np.ndarray:
    """The positions a boolean mask hides, as ``(batch or 1, kv_heads or 1, rep or 1, n, length)``."""
    hidden = ~mask
    if hidden.ndim == 2:
        return hidden.reshape(1, 1, 1, *hidden.shape)
    if hidden.shape[1] == 1:
        return hidden.reshape(hidden.shape[0], 1, 1, *hidden.shape[2:])
    return hidden.reshape(hidden.shape[0], kv_heads, rep, *hidden.shape[2:])


def _hide(scores: np.ndarray, hidden: np.ndarray) -> None:
    """Sets the scores of hidden positions to :data:`MASKED`, in place, writing only the columns
    between the first and the last hidden one (a prompt's chunk: its own last positions)."""
    columns = np.flatnonzero(hidden.reshape(-1, hidden.shape[-1]).any(axis=0))
    if columns.size:
        lo, hi = columns[0], columns[-1] + 1
        np.copyto(scores[..., lo:hi], MASKED, where=hidden[..., lo:hi])


def reset_peak() -> None:
    """Restarts :data:`peak`."""
    global peak
    peak = 0


def install() -> bool:
    """Uses :func:`attention` for mlx-lm's models when MLX computes on the CPU; returns whether
    it did."""
    if mx.default_device() != mx.cpu:
        return False
    mx.fast.scaled_dot_product_attention = attention
    return True
