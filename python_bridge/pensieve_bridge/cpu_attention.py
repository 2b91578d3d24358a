"""Attention over a long context on a CPU, without MLX's scalar ``exp``.

MLX's CPU ``exp`` is scalar on x86-64 (``simd::exp<float, 1>``, and each of its multiply-adds a
call to libm's ``fmaf``): about 12 ns an element here, where ``mx.power`` (libm's ``powf``) takes
about 4 and a multiplication well under 1. Attention's softmax is that ``exp`` over every
position of the context, for every query and head: one layer of the demo model, 8 queries over
6,500 positions, took 3.0 ms in ``mx.fast.scaled_dot_product_attention``, 2.5 of them in
``exp``. That made every step that reads a long prompt, or decodes beside one, several times a
short decoding step (BENCHMARKS.md: the step budget).

:func:`attention` computes the same attention with the softmax in base 2 (the scores scaled by
log2(e) once, then ``mx.power(2, s - max)``): equal to MLX's within float32 rounding (1e-7 here).
:func:`install` puts it in place of ``mx.fast.scaled_dot_product_attention`` on a CPU, where
mlx-lm's models call it; it serves the cases where it is the same computation (float32, no
attention sinks, no mask or a causal or boolean one, up to :data:`MAX_QUERIES` queries over a
context long enough that ``exp`` is most of the work, :data:`MIN_WORK`: decoding and the step
budget's chunks at long contexts) and hands every other call to MLX's own.

Measured on one layer, ``mx.fast`` against this, in ms (4 heads of 16; 9 query heads on 3 KV
heads of 64, SmolLM2's shape):

| queries × positions | 1 × 6,500 | 8 × 6,500 | 8 × 512 | 1 × 128 |
|---|---|---|---|---|
| 4 heads of 16 | 0.52 / 0.39 | 2.97 / 1.74 | 0.28 / 0.21 | 0.054 / 0.070 (MLX's kept) |
| 9 on 3 heads of 64 | 1.59 / 1.14 | 8.46 / 4.74 | 0.67 / 0.43 | 0.107 / 0.109 (MLX's kept) |
"""

from __future__ import annotations

import math

import mlx.core as mx

#: Calls with more queries than this (full prefill chunks) go to MLX's own attention.
MAX_QUERIES = 64
#: Calls with fewer queries × positions than this go to MLX's own attention, which is the faster
#: where ``exp`` is not most of the work (one query: under ~1,000 positions; measured here, one
#: layer of the demo model: 0.054 against 0.070 ms at 128 positions, 0.207 against 0.177 at 2,048).
MIN_WORK = 2048
LOG2E = 1.0 / math.log(2.0)
#: What a masked position scores: finite, so that a row with every position masked (a padding
#: query) gives finite values, as MLX's own attention does, not NaN.
MASKED = float(mx.finfo(mx.float32).min)

_mlx = mx.fast.scaled_dot_product_attention


def attention(q, k, v, *, scale, mask=None, sinks=None, **kwargs):
    """``mx.fast.scaled_dot_product_attention`` (same arguments and result), in base 2 when
    that is the same computation (see the module docs)."""
    b, heads, n, d = q.shape
    kv_heads, length = k.shape[1], k.shape[2]
    rep = heads // kv_heads
    # The cheap checks first: most calls (a short context) go to MLX before any mask is built.
    served = not (sinks is not None or kwargs or q.dtype != mx.float32 or k.dtype != mx.float32)
    grouped = _mask(mask, heads, kv_heads, rep, n, length) if served and MIN_WORK <= n * length and n <= MAX_QUERIES else False
    if grouped is False:
        return _mlx(q, k, v, scale=scale, mask=mask, sinks=sinks, **kwargs)
    # Query heads that share a KV head, stacked: (b, kv_heads, rep * n, d).
    scores = (q.reshape(b, kv_heads, rep * n, d) * (scale * LOG2E)) @ k.swapaxes(-1, -2)
    scores = scores.reshape(b, kv_heads, rep, n, length)
    if grouped is not None:
        scores = mx.where(grouped, scores, MASKED)
    weights = mx.power(2.0, scores - scores.max(axis=-1, keepdims=True))
    weights = weights / weights.sum(axis=-1, keepdims=True)
    out = weights.reshape(b, kv_heads, rep * n, length) @ v
    return out.reshape(b, heads, n, v.shape[-1])


def _mask(mask, heads, kv_heads, rep, n, length):
    """The mask as ``(batch, kv_heads or 1, rep or 1, n, length)`` booleans (None: no mask;
    False: a mask this module leaves to MLX)."""
    if mask is None:
        return None
    if isinstance(mask, str):
        if mask != "causal":
            return False
        return mx.arange(length)[None, :] <= mx.arange(length - n, length)[:, None]
    if not isinstance(mask, mx.array) or mask.dtype != mx.bool_ or tuple(mask.shape[-2:]) != (n, length):
        return False
    if mask.ndim == 2:
        return mask
    if mask.ndim == 4 and mask.shape[1] == 1:
        return mask.reshape(mask.shape[0], 1, 1, n, length)
    if mask.ndim == 4 and mask.shape[1] == heads:
        return mask.reshape(mask.shape[0], kv_heads, rep, n, length)
    return False


def install() -> bool:
    """Uses :func:`attention` for mlx-lm's models when MLX computes on the CPU; returns whether
    it did."""
    if mx.default_device() != mx.cpu:
        return False
    mx.fast.scaled_dot_product_attention = attention
    return True
