"""Every implementation of dot_product_attention against the reference: outputs and the
gradients of q, k and v, at odd lengths, with GQA, packed segments and explicit masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrax.pallas_kernels.dot_product_attention import dot_product_attention
from hybrax.pallas_kernels.dot_product_attention.api import IMPLEMENTATIONS

CPU_IMPLEMENTATIONS = ["xla"]


def inputs(T, *, B=2, H=4, G=2, D=16, Tk=None, dtype=jnp.float32, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    Tk = T if Tk is None else Tk
    q = jax.random.normal(kq, (B, T, H, D), dtype)
    k = jax.random.normal(kk, (B, Tk, G, D), dtype)
    v = jax.random.normal(kv, (B, Tk, G, D), dtype)
    return q, k, v


def packed_segments(B, T, seed=0):
    """Random document boundaries per row, segment ids counting from 1."""
    rng = np.random.default_rng(seed)
    starts = rng.random((B, T)) < 0.05
    starts[:, 0] = True
    return jnp.asarray(np.cumsum(starts, axis=1), jnp.int32)


def loss_and_grads(impl, q, k, v, **kw):
    def f(q, k, v):
        o = dot_product_attention(q, k, v, implementation=impl, **kw)
        return jnp.sum(o.astype(jnp.float32) * jnp.cos(jnp.arange(o.size).reshape(o.shape)))
    return dot_product_attention(q, k, v, implementation=impl, **kw), jax.grad(f, argnums=(0, 1, 2))(q, k, v)


def assert_matches(impl, q, k, v, atol, **kw):
    out, grads = loss_and_grads(impl, q, k, v, **kw)
    ref_out, ref_grads = loss_and_grads("reference", q.astype(jnp.float32), k.astype(jnp.float32),
                                        v.astype(jnp.float32), **kw)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref_out, atol=atol, rtol=atol)
    for name, g, rg in zip("qkv", grads, ref_grads):
        scale = float(jnp.max(jnp.abs(rg))) + 1e-6
        err = float(jnp.max(jnp.abs(g.astype(jnp.float32) - rg))) / scale
        assert err < atol, f"d{name}: relative error {err:.2e} >= {atol}"


@pytest.mark.parametrize("impl", CPU_IMPLEMENTATIONS)
@pytest.mark.parametrize("T", [1, 63, 65, 257])
def test_causal_matches_reference(impl, T):
    assert_matches(impl, *inputs(T, B=1 if T == 257 else 2), atol=1e-5, causal=True)


@pytest.mark.parametrize("impl", CPU_IMPLEMENTATIONS)
@pytest.mark.parametrize("T", [63, 65])
def test_packed_segments_match_reference(impl, T):
    q, k, v = inputs(T)
    assert_matches(impl, q, k, v, atol=1e-5, causal=True, segment_ids=packed_segments(2, T))


@pytest.mark.parametrize("impl", CPU_IMPLEMENTATIONS)
def test_bfloat16_matches_float32_reference(impl):
    assert_matches(impl, *inputs(65, dtype=jnp.bfloat16), atol=3e-2, causal=True, segment_ids=packed_segments(2, 65))


@pytest.mark.parametrize("impl", CPU_IMPLEMENTATIONS)
def test_decode_mask_against_longer_keys(impl):
    """3 queries at the end of 40 keys with a padding mask: the KV-cache case."""
    q, k, v = inputs(3, Tk=40)
    visible = jnp.arange(40)[None, :] <= (30 + jnp.arange(3))[:, None]
    assert_matches(impl, q, k, v, atol=1e-5, causal=False, mask=visible)
    assert_matches(impl, q, k, v, atol=1e-5, causal=True)


def test_reference_is_softmax_attention():
    """The reference against an independent loop over queries, with GQA head sharing."""
    q, k, v = inputs(9, B=1, H=4, G=2, D=8)
    out = dot_product_attention(q, k, v, implementation="reference")
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    for t in range(9):
        for h in range(4):
            s = k[0, : t + 1, h // 2] @ q[0, t, h] / np.sqrt(8)
            w = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
            np.testing.assert_allclose(out[0, t, h], w @ v[0, : t + 1, h // 2], atol=1e-5)


def test_segments_do_not_leak():
    """Changing the keys of one document leaves the other document's outputs unchanged."""
    q, k, v = inputs(32)
    seg = jnp.asarray(np.repeat([[1] * 20 + [2] * 12], 2, axis=0), jnp.int32)
    out = dot_product_attention(q, k, v, segment_ids=seg)
    out2 = dot_product_attention(q, k.at[:, :20].add(1.0), v.at[:, :20].add(1.0), segment_ids=seg)
    np.testing.assert_array_equal(out[:, 20:], out2[:, 20:])
    assert not np.allclose(out[:, :20], out2[:, :20])


def test_fully_masked_query_returns_zeros():
    q, k, v = inputs(4)
    mask = jnp.ones((4, 4), bool).at[2].set(False)
    for impl in ["reference"] + CPU_IMPLEMENTATIONS:
        out = dot_product_attention(q, k, v, causal=False, mask=mask, implementation=impl)
        np.testing.assert_array_equal(out[:, 2], 0.0)


def test_cudnn_falls_through_on_cpu():
    q, k, v = inputs(8)
    with pytest.raises(NotImplementedError, match="cudnn"):
        dot_product_attention(q, k, v, implementation="cudnn")
    out = dot_product_attention(q, k, v, implementation=["cudnn", "xla"])
    np.testing.assert_allclose(out, dot_product_attention(q, k, v, implementation="reference"), atol=1e-5)
    assert set(IMPLEMENTATIONS) == {"reference", "xla", "cudnn", "splash", "pallas_gpu"}


def test_bad_inputs_name_the_problem():
    q, k, v = inputs(8, H=3, G=2)
    with pytest.raises(ValueError, match="query heads=3 must be a multiple of key/value heads=2"):
        dot_product_attention(q, k, v)
    q, k, v = inputs(8)
    with pytest.raises(ValueError, match="implementation='flash'"):
        dot_product_attention(q, k, v, implementation="flash")
    with pytest.raises(ValueError, match="segment_ids"):
        dot_product_attention(q, k, v, segment_ids=jnp.ones((2, 7), jnp.int32))
