"""Each linear mixer against its paper's formula, written independently in float64 numpy in the
quadratic (attention-like) form: o_t = sum_{s <= t} (decay from s to t) (q_t . k_s) v_s; and bf16
compute against float32."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrax.layers.linear.gla import GLA, GLAConfig
from hybrax.layers.linear.linear_attention import LinearAttention, LinearAttentionConfig
from hybrax.layers.linear.mamba2 import Mamba2, Mamba2Config
from hybrax.layers.short_conv import short_causal_conv

D, T = 16, 10


def p(param) -> np.ndarray:
    return np.asarray(param[...], np.float64)


def silu(x):
    return x / (1 + np.exp(-x))


def rms(x, axes):
    return x / np.sqrt((x * x).mean(axis=axes, keepdims=True) + 1e-5)


def quadratic_form(q_TxHxK, k_TxHxK, v_TxHxV, log_decay_TxHxK, scale):
    """o_t = scale sum_{s<=t} sum_k q_tk exp(G_tk - G_sk) k_sk v_s with G the cumulative log decay."""
    G = np.cumsum(log_decay_TxHxK, axis=0)
    o = np.zeros(v_TxHxV.shape)
    for t in range(q_TxHxK.shape[0]):
        for s in range(t + 1):
            weight_H = np.sum(q_TxHxK[t] * np.exp(G[t] - G[s]) * k_TxHxK[s], axis=-1)
            o[t] += scale * weight_H[:, None] * v_TxHxV[s]
    return o


def x_input(seed=0):
    return np.random.default_rng(seed).normal(size=(T, D))


def randomise(layer, seed):
    """Non-trivial values for every parameter (ones and zeros would hide mistakes)."""
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(nnx.state(layer, nnx.Param)):
        var[...] = var[...] + jnp.asarray(rng.normal(scale=0.3, size=var[...].shape), var[...].dtype)


@pytest.mark.parametrize("decay", [True, False])
def test_lightning_attention_formula(decay):
    c = LinearAttentionConfig(d_model=D, num_heads=2, head_dim=4, decay=decay, chunk_size=4)
    layer = LinearAttention(c, rngs=nnx.Rngs(0))
    randomise(layer, 1)
    x = x_input()
    q, k = silu(np.einsum("td,dhk->thk", x, p(layer.w_q))), silu(np.einsum("td,dhk->thk", x, p(layer.w_k)))
    v, u = np.einsum("td,dhk->thk", x, p(layer.w_v)), np.einsum("td,dhk->thk", x, p(layer.w_u))
    rates = np.log1p(-(2.0 ** -(5 + np.arange(2)))) if decay else np.zeros(2)
    log_decay = np.broadcast_to(rates[None, :, None], (T, 2, 4))
    o = quadratic_form(q, k, v, log_decay, 4 ** -0.5)
    y = np.einsum("thk,hkd->td", rms(o, -1) * p(layer.norm.scale) * silu(u), p(layer.w_o))
    np.testing.assert_allclose(layer(jnp.asarray(x[None], jnp.float32))[0], y, rtol=2e-4, atol=2e-5)


def test_gla_formula():
    c = GLAConfig(d_model=D, num_heads=2, key_dim=4, value_dim=8, gate_rank=3, chunk_size=4)
    layer = GLA(c, rngs=nnx.Rngs(0))
    randomise(layer, 2)
    x = x_input(1)
    q, k = np.einsum("td,dhk->thk", x, p(layer.w_q)), np.einsum("td,dhk->thk", x, p(layer.w_k))
    v, r = np.einsum("td,dhv->thv", x, p(layer.w_v)), np.einsum("td,dhv->thv", x, p(layer.w_r))
    logit = np.einsum("td,dr,rhk->thk", x, p(layer.w_gate_down), p(layer.w_gate_up)) + p(layer.gate_bias)
    log_decay = -np.log1p(np.exp(-logit)) / 16.0
    o = quadratic_form(q, k, v, log_decay, 4 ** -0.5)
    y = np.einsum("thv,hvd->td", rms(o, -1) * p(layer.norm.scale) * silu(r), p(layer.w_o))
    np.testing.assert_allclose(layer(jnp.asarray(x[None], jnp.float32))[0], y, rtol=2e-4, atol=2e-5)


def causal_conv(x_TxC, weight_WxC, bias_C):
    W = weight_WxC.shape[0]
    padded = np.concatenate([np.zeros((W - 1,) + x_TxC.shape[1:]), x_TxC])
    return bias_C + sum(weight_WxC[i] * padded[i:i + len(x_TxC)] for i in range(W))


def test_mamba2_formula():
    c = Mamba2Config(d_model=D, num_heads=2, head_dim=4, state_dim=3, chunk_size=4)
    layer = Mamba2(c, rngs=nnx.Rngs(0))
    randomise(layer, 3)
    x = x_input(2)
    z, xs = np.einsum("td,dhp->thp", x, p(layer.w_z)), np.einsum("td,dhp->thp", x, p(layer.w_x))
    b, cc = x @ p(layer.w_b), x @ p(layer.w_c)
    xs = silu(causal_conv(xs, p(layer.conv_x), p(layer.conv_x_bias)))
    b = silu(causal_conv(b, p(layer.conv_b), p(layer.conv_b_bias)))
    cc = silu(causal_conv(cc, p(layer.conv_c), p(layer.conv_c_bias)))
    dt = np.log1p(np.exp(x @ p(layer.w_dt) + p(layer.dt_bias)))  # [T, H]
    log_decay = np.broadcast_to((dt * -np.exp(p(layer.a_log)))[..., None], (T, 2, 3))
    o = quadratic_form(np.broadcast_to(cc[:, None], (T, 2, 3)), np.broadcast_to(b[:, None], (T, 2, 3)),
                       xs * dt[..., None], log_decay, 1.0)
    o = (o + p(layer.d_skip)[:, None] * xs) * silu(z)
    y = np.einsum("thp,hpd->td", rms(o, (-2, -1)) * p(layer.norm.scale), p(layer.w_out))
    np.testing.assert_allclose(layer(jnp.asarray(x[None], jnp.float32))[0], y, rtol=2e-4, atol=2e-5)


def test_short_conv_resets_at_segments_and_carries_state():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(1, 9, 3)).astype(np.float32)
    weight, bias = rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=(3,)).astype(np.float32)
    seg = jnp.asarray([[0] * 5 + [1] * 4])
    y, _ = short_causal_conv(jnp.asarray(x), jnp.asarray(weight), jnp.asarray(bias), segment_ids=seg)
    np.testing.assert_allclose(y[0, :5], causal_conv(x[0, :5], weight, bias), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y[0, 5:], causal_conv(x[0, 5:], weight, bias), rtol=1e-5, atol=1e-6)
    # in pieces with the carried state == in one go
    first, state = short_causal_conv(jnp.asarray(x[:, :2]), jnp.asarray(weight), jnp.asarray(bias))
    second, _ = short_causal_conv(jnp.asarray(x[:, 2:]), jnp.asarray(weight), jnp.asarray(bias), state=state)
    np.testing.assert_allclose(np.concatenate([first, second], 1)[0], causal_conv(x[0], weight, bias), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("module,config", [
    (LinearAttention, LinearAttentionConfig(d_model=D, num_heads=2, head_dim=8, chunk_size=4)),
    (GLA, GLAConfig(d_model=D, num_heads=2, key_dim=8, value_dim=8, gate_rank=4, chunk_size=4)),
    (Mamba2, Mamba2Config(d_model=D, num_heads=2, head_dim=8, state_dim=8, chunk_size=4)),
], ids=["linear_attention", "gla", "mamba2"])
def test_bfloat16_compute_tracks_float32(module, config):
    """The same parameters with bf16 compute (float32 accumulation and state) stay within bf16
    rounding of float32."""
    high = module(config, rngs=nnx.Rngs(0))
    randomise(high, 5)
    low = module(config.model_copy(update={"dtype": "bfloat16"}), rngs=nnx.Rngs(0))
    nnx.update(low, nnx.state(high, nnx.Param))
    x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 11, D)), jnp.float32)
    forward = jax.jit(lambda layer, x: layer(x))
    y32, y16 = forward(high, x), forward(low, x)
    assert y16.dtype == jnp.bfloat16
    err = float(jnp.linalg.norm(y16.astype(jnp.float32) - y32) / jnp.linalg.norm(y32))
    assert err < 2e-2, err
