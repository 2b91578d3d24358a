"""Attention computed by numpy on the CPU gives MLX's own attention, within float32 rounding, for every
shape and mask it serves, and hands the others to MLX's."""

import mlx.core as mx
import pytest
from pensieve_bridge import cpu_attention
from pensieve_bridge.cpu_attention import _served_mask, attention

MLX = cpu_attention._mlx


def random(*shape):
    return mx.random.normal(shape)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (9, 3), (8, 1)])
@pytest.mark.parametrize("n,length", [(1, 1), (1, 300), (5, 37), (8, 6500), (64, 200), (300, 700)])
@pytest.mark.parametrize("mask", [None, "causal", "bool2", "bool4", "bool4heads"])
@pytest.mark.parametrize("block", [32 << 20, 1])
def test_the_same_attention_as_mlx(heads, kv_heads, n, length, mask, block, monkeypatch):
    monkeypatch.setattr(cpu_attention, "MIN_WORK", 0)  # every size by numpy, small ones too
    # 1 byte: a block per query (a long prompt's chunk over a long context is cut into blocks)
    monkeypatch.setattr(cpu_attention, "BLOCK_BYTES", block)
    mx.random.seed(heads * 1000 + n * 10 + length)
    b, d = 2, 16
    q, k, v = random(b, heads, n, d), random(b, kv_heads, length, d), random(b, kv_heads, length, d)
    if mask == "bool2":
        mask = mx.random.uniform(shape=(n, length)) < 0.8
    elif mask == "bool4":
        # Left padding, as mlx-lm's batch caches mask it: the first positions of one sequence.
        mask = mx.broadcast_to(mx.arange(length)[None, None, None, :] >= mx.array([0, length // 3])[:, None, None, None], (b, 1, n, length))
    elif mask == "bool4heads":
        mask = mx.random.uniform(shape=(b, heads, n, length)) < 0.7
    if isinstance(mask, str) and length < n:
        return
    ours = cpu_attention.attention(q, k, v, scale=0.25, mask=mask)
    theirs = MLX(q, k, v, scale=0.25, mask=mask)
    assert ours.shape == theirs.shape
    assert mx.allclose(ours, theirs, atol=1e-5, rtol=1e-4).item(), mx.abs(ours - theirs).max().item()


def test_a_query_with_every_position_masked_is_finite(monkeypatch):
    monkeypatch.setattr(cpu_attention, "MIN_WORK", 0)
    q, k, v = random(1, 2, 3, 8), random(1, 2, 10, 8), random(1, 2, 10, 8)
    mask = mx.ones((1, 1, 3, 10), dtype=mx.bool_)
    mask[:, :, 0, :] = False  # a padding query sees nothing
    out = attention(q, k, v, scale=0.3, mask=mask)
    assert mx.isfinite(out).all().item()
    assert mx.allclose(out[:, :, 1:], MLX(q, k, v, scale=0.3, mask=mask)[:, :, 1:], atol=1e-5).item()


def test_what_it_does_not_serve_goes_to_mlx(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_attention, "_mlx", lambda *a, **kw: calls.append(kw) or "mlx")
    length = cpu_attention.MIN_WORK  # enough work for numpy, unless something else says no
    q, k, v = random(1, 2, 3, 8), random(1, 2, length, 8), random(1, 2, length, 8)
    assert not isinstance(attention(q, k, v, scale=1.0, mask="causal"), str)
    assert not isinstance(attention(q, k, v, scale=1.0), str)
    assert calls == []
    assert attention(q.astype(mx.float16), k.astype(mx.float16), v.astype(mx.float16), scale=1.0) == "mlx"
    assert attention(q, k, v, scale=1.0, sinks=mx.zeros((2,))) == "mlx"
    assert attention(q, k, v, scale=1.0, mask=mx.zeros((1, 1, 3, length))) == "mlx"  # additive
    assert attention(q, k, v, scale=1.0, mask=mx.ones((1, 2, 1, 3, length), dtype=mx.bool_)) == "mlx"
    assert attention(q, k[:, :, :10], v[:, :, :10], scale=1.0) == "mlx"  # 3 × 10: little exp to save
    assert len(calls) == 5


def test_strided_queries_and_keys_and_values_cut_from_a_larger_buffer(monkeypatch):
    # As in a model: queries transposed from (batch, n, heads, d), keys and values the first
    # positions of a cache's buffer; numpy reads them in place, by their strides.
    monkeypatch.setattr(cpu_attention, "MIN_WORK", 0)
    q = random(2, 7, 9, 16).transpose(0, 2, 1, 3)
    k, v = random(2, 3, 300, 16)[:, :, :200], random(2, 3, 300, 16)[:, :, :200]
    left = mx.broadcast_to(mx.arange(200)[None, None, None, :] >= mx.array([0, 50])[:, None, None, None], (2, 1, 7, 200))
    for mask in (None, "causal", left):
        ours, theirs = attention(q, k, v, scale=0.25, mask=mask), MLX(q, k, v, scale=0.25, mask=mask)
        assert mx.allclose(ours, theirs, atol=1e-5, rtol=1e-4).item(), mx.abs(ours - theirs).max().item()


def test_the_demo_model_says_the_same_after_a_long_prompt_with_either_attention(engine, monkeypatch):
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.sample_utils import make_sampler

    prompt = mx.array([(i * 7919) % 1000 + 10 for i in range(3000)])

    def tokens():
        steps = generate_step(prompt, engine.model, max_tokens=24, sampler=make_sampler(0.0), prompt_cache=make_prompt_cache(engine.model))
        return [int(t) for t, _ in steps]

    assert mx.fast.scaled_dot_product_attention is attention  # installed by the engine on a CPU
    calls = []
    monkeypatch.setattr(cpu_attention, "_served_mask", lambda *a: calls.append(_served_mask(*a)) or calls[-1])
    ours = tokens()
    assert calls and all(calls)  # numpy computed the prompt's chunks and the decoding steps
    monkeypatch.setattr(cpu_attention, "MIN_WORK", 1 << 62)
    assert ours == tokens()
