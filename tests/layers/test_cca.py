"""Compressed Convolutional Attention (layers/softmax/cca.py) against independent references; the
mixer contract itself is checked by tests/layers/test_conformance.py at its tiny CCGQA settings.

    1. compression 1, identity convolutions, no mean / shift / norm  == the attention mixer
    2. the whole layer (convolutions, q-k mean, value shift, norm, rotary, attention) == a float64
       numpy loop over t written from the module docstring's formulas, packed documents included
    3. decoding token by token == chunks == the parallel form, for plain CCA and CCGQA with wider
       convolutions than the conformance suite's
    4. init_cache bytes == B (S kv_cache_bytes_per_token + state_bytes_per_sequence) + 4 (`end`)
    5. (slow, 8 fake devices) sequence parallel == one device with wider convolutions
Lengths are odd (13); row 0 packs two documents, the second starting at DOCUMENT_START."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import conformance
from hybrax.layers.softmax.attention import Attention, AttentionConfig
from hybrax.layers.softmax.cca import CCA, CCAConfig

T, B, DOCUMENT_START = 13, 2, 6
SEGMENT_IDS = np.asarray([[1] * DOCUMENT_START + [2] * (T - DOCUMENT_START), [5] * T], np.int32)
POSITIONS = np.asarray([list(range(DOCUMENT_START)) + list(range(T - DOCUMENT_START)), list(range(T))], np.int32)


def randomised(config: CCAConfig, seed: int = 0) -> CCA:
    """A CCA whose parameters are all random (temperature in [0.5, 1.5]), far from initialisation."""
    module = CCA(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(seed)
    for path, param in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        shape = param[...].shape
        value = rng.uniform(0.5, 1.5, shape) if path[0] == "temperature" else rng.normal(0, 0.3, shape)
        param[...] = jnp.asarray(value, jnp.float32)
    return module


def jitted(module):
    graphdef, state = nnx.split(module)
    call = jax.jit(lambda state, x, segment_ids, positions, cache: nnx.merge(graphdef, state)(
        x, segment_ids=segment_ids, positions=positions, cache=cache))
    return lambda x, segment_ids=None, positions=None, cache=None: call(state, x, segment_ids, positions, cache)


def inputs(seed: int = 0, d_model: int = 32) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=(B, T, d_model)), jnp.float32)


# ---- 1. compression 1 with identity convolutions is attention ------------------------------------------

@pytest.mark.parametrize("kv_heads", [4, 2])
def test_without_compression_convolutions_mean_shift_and_norm_it_is_attention(kv_heads):
    cca_config = CCAConfig(d_model=32, num_heads=4, head_dim=8, compression=1, kv_heads=kv_heads, conv_widths=(3, 2),
                           qk_mean=False, value_shift=False, qk_norm=False)
    cca = randomised(cca_config)
    k1, k2 = cca_config.conv_widths
    cca.conv1_q[...] = jnp.zeros((k1, 4, 8)).at[-1].set(1.0)
    cca.conv1_k[...] = jnp.zeros((k1, kv_heads, 8)).at[-1].set(1.0)
    cca.conv2_q[...] = jnp.zeros((k2, 4, 8, 8)).at[-1].set(jnp.eye(8))
    cca.conv2_k[...] = jnp.zeros((k2, kv_heads, 8, 8)).at[-1].set(jnp.eye(8))
    attention = Attention(AttentionConfig(d_model=32, num_heads=4, num_kv_heads=kv_heads, head_dim=8),
                          rngs=nnx.Rngs(1))
    for name in ("w_q", "w_k", "w_v", "w_o"):
        getattr(attention, name)[...] = getattr(cca, name)[...]
    x = inputs(1)
    got = jitted(cca)(x, jnp.asarray(SEGMENT_IDS), jnp.asarray(POSITIONS))
    want = jitted(attention)(x, jnp.asarray(SEGMENT_IDS), jnp.asarray(POSITIONS))
    assert conformance.error(got, want) <= 1e-6, conformance.error(got, want)


# ---- 2. the formulas, as a float64 loop -----------------------------------------------------------------

def rotary(z_HxD, position, theta):
    half = z_HxD.shape[-1] // 2
    angle = position * theta ** (-np.arange(half) / half)
    z1, z2 = z_HxD[:, :half], z_HxD[:, half:]
    return np.concatenate([z1 * np.cos(angle) - z2 * np.sin(angle), z2 * np.cos(angle) + z1 * np.sin(angle)], -1)


def reference(module: CCA, x_BxTxE, segment_ids, positions):
    """y [B, T, E] of the module docstring, one token and one head at a time, float64."""
    c = module.config
    p = {path[0]: np.asarray(param[...], np.float64) for path, param in nnx.to_flat_state(nnx.state(module, nnx.Param))}
    D, Hq, Hkv = c.head_dim, c.latent_heads, c.latent_kv_heads
    G, (k1, k2) = Hq // Hkv, c.conv_widths
    x = np.asarray(x_BxTxE, np.float64)
    y = np.zeros(x.shape)
    for b in range(x.shape[0]):
        start = [min(s for s in range(t + 1) if segment_ids[b, s] == segment_ids[b, t]) for t in range(T)]
        seen = lambda t, s: s >= start[t]  # noqa: E731  (s <= t always below)
        q0, k0, v0 = (x[b] @ p[w].reshape(c.d_model, -1) for w in ("w_q", "w_k", "w_v"))
        q0, k0, v0 = q0.reshape(T, Hq, D), k0.reshape(T, Hkv, D), v0.reshape(T, Hkv, D)

        def conv1(z, w):
            return np.stack([sum(w[i] * z[t - k1 + 1 + i] for i in range(k1) if seen(t, t - k1 + 1 + i))
                             for t in range(T)])

        def conv2(a, w):
            return np.stack([sum(np.einsum("hd,hde->he", a[t - k2 + 1 + i], w[i]) for i in range(k2)
                                 if seen(t, t - k2 + 1 + i)) for t in range(T)])

        q = conv2(conv1(q0, p["conv1_q"]), p["conv2_q"])
        k = conv2(conv1(k0, p["conv1_k"]), p["conv2_k"])
        v = v0.copy()
        for t in range(T):
            if c.qk_mean:
                q[t] += (q0[t] + np.repeat(k0[t], G, axis=0)) / 2
                k[t] += (q0[t].reshape(Hkv, G, D).mean(1) + k0[t]) / 2
            if c.value_shift:
                v[t, :, D // 2:] = v0[t - 1, :, D // 2:] if seen(t, t - 1) else 0.0
            if c.qk_norm:
                q[t] = p["temperature"][:, None] * np.sqrt(D) * q[t] / np.sqrt((q[t] ** 2).sum(-1, keepdims=True)
                                                                               + c.norm_eps)
                k[t] = np.sqrt(D) * k[t] / np.sqrt((k[t] ** 2).sum(-1, keepdims=True) + c.norm_eps)
            q[t], k[t] = rotary(q[t], positions[b, t], c.rope_theta), rotary(k[t], positions[b, t], c.rope_theta)
        for t in range(T):
            o = np.zeros((Hq, D))
            for h in range(Hq):
                keys = range(start[t], t + 1)
                scores = np.array([q[t, h] @ k[s, h // G] / np.sqrt(D) for s in keys])
                weights = np.exp(scores - scores.max())
                o[h] = sum(w * v[s, h // G] for w, s in zip(weights / weights.sum(), keys))
            y[b, t] = np.einsum("hd,hde->e", o, p["w_o"])
    return y


@pytest.mark.parametrize("widths", [(2, 2), (3, 4)])
def test_the_layer_is_its_formula_with_packed_documents(widths):
    config = CCAConfig(d_model=32, num_heads=8, head_dim=8, compression=2, kv_heads=2, conv_widths=widths)
    module = randomised(config, seed=2)
    x = inputs(3)
    got = jitted(module)(x, jnp.asarray(SEGMENT_IDS), jnp.asarray(POSITIONS))
    want = reference(module, x, SEGMENT_IDS, POSITIONS)
    assert conformance.error(got, want) <= 1e-5, conformance.error(got, want)


# ---- 3. decoding -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kv_heads", [None, 1])   # plain CCA (Hkv = Hq = 2), CCGQA
def test_decoding_token_by_token_and_in_chunks_equals_the_parallel_form(kv_heads):
    config = CCAConfig(d_model=32, num_heads=4, head_dim=8, compression=2, kv_heads=kv_heads, conv_widths=(3, 4))
    module = randomised(config, seed=4)
    layer, x = jitted(module), inputs(5)
    full = layer(x)
    for chunks in ((1,) * T, (T,), (2, 1, 5, 1, 4)):   # chunks shorter and longer than the carried rows
        cache, outputs, start = module.init_cache(B, T + 3), [], 0
        for n in chunks:
            y, cache = layer(x[:, start:start + n], cache=cache)
            outputs.append(y)
            start += n
        got = jnp.concatenate(outputs, axis=1)
        assert conformance.error(got, full) <= 1e-5, (chunks, conformance.error(got, full))


# ---- 4. cache bytes --------------------------------------------------------------------------------------

@pytest.mark.parametrize("settings", [{}, {"conv_widths": (3, 1), "value_shift": False, "kv_heads": 1},
                                      {"conv_widths": (1, 1), "dtype": "bfloat16"}])
def test_the_cache_holds_what_the_config_says(settings):
    config = CCAConfig(d_model=32, num_heads=4, head_dim=8, **settings)
    module = CCA(config, rngs=nnx.Rngs(0))
    for batch in (1, 3):
        for max_len in (7, 20):
            shapes = jax.eval_shape(lambda: module.init_cache(batch, max_len))  # noqa: B023
            measured = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(shapes))
            formula = batch * (max_len * config.kv_cache_bytes_per_token() + config.state_bytes_per_sequence()) + 4
            assert measured == formula, (settings, batch, max_len, measured, formula)


def test_a_compression_that_does_not_divide_the_heads_is_refused():
    with pytest.raises(ValueError, match="compression=3 does not divide num_heads=4"):
        CCAConfig(num_heads=4, compression=3)
    with pytest.raises(ValueError, match="kv_heads=3 does not divide"):
        CCAConfig(num_heads=8, compression=2, kv_heads=3)


# ---- 5. sequence parallel with several delayed copies per convolution ----------------------------------

WIDE = "cca_wide_convolutions"
REGISTER_WIDE = "\n".join([
    "from hybrax.layers.softmax.cca import CCA, CCAConfig",
    "class WideConfig(CCAConfig):",
    "    tiny = {'compression': 2, 'conv_widths': (3, 3)}",
    f"conformance.MIXERS.register({WIDE!r}, WideConfig, CCA)"])


@pytest.mark.slow
@pytest.mark.multi_device
def test_sequence_parallel_with_wide_convolutions_equals_one_device():
    """The sharded check of the conformance suite (documents on chunk seams, one-token documents) with
    conv widths 3: two delayed copies per convolution travel in each halo."""
    conformance.assert_sharded(WIDE, conformance.run_sharded([WIDE], setup=REGISTER_WIDE)[WIDE])
