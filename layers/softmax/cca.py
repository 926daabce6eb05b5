"""Compressed Convolutional Attention (Figliolia et al., 2025, "Compressed Convolutional Attention:
Efficient Attention in a Compressed Latent Space", Zyphra, arXiv 2510.04476): queries, keys and
values are down-projected into a latent C times narrower, and the whole attention runs there. With
fewer key/value heads than latent query heads it is CCGQA (the paper's grouped-query form).

    q~ = x W_q  [B, T, Hq, D],  k~ = x W_k  [B, T, Hkv, D]          Hq = H / C latent query heads
    v  = [x_t W_v_now | x_{t-1} W_v_prev]  [B, T, Hkv, D/2 + D/2]   (value_shift; x_{t-1} = 0 at a
         document's first token), else v = x W_v                    W_v = [W_v_now | W_v_prev]
    conv1(z)[t, h, d] = sum_i w1[i, h, d] z[t - k1 + 1 + i, h, d]          depthwise in time
    conv2(z)[t, h, :] = sum_i z[t - k2 + 1 + i, h, :] @ W2[i, h]           time and each head's channels
    q = conv2(conv1(q~)) + (q~ + k~ repeated to Hq heads) / 2             (qk_mean; without: no mean)
    k = conv2(conv1(k~)) + (mean of q~ over each kv head's group + k~) / 2
    q = g_h sqrt(D) q / |q|,  k = sqrt(D) k / |k|   per head, |z| = sqrt(sum z^2 + eps)   (qk_norm)
    rotary on q and k at `positions`
    o = softmax(q k^T / sqrt(D) + causal/segment mask) v  [B, T, Hq, D],   y = o W_o  [B, T, d_model]

Every convolution and the value shift is causal and reads zeros before a document's first token
(before the sequence, and across a change of segment_ids). Query head h reads kv head h // (Hq / Hkv).
Paths, as `layers/softmax/skeleton.py`:
- no cache, one device on seq: `dot_product_attention(causal=True, segment_ids=...)`.
- a mesh with seq > 1 (rows in zigzag order): the convolutions and the value shift read rows held by
  other devices. They are written over delayed copies of their inputs (delay_s(z)[t] = z[t - s]), and
  a delay by s rows is a depthwise causal convolution with a one-hot weight, so
  `short_causal_convs_sequence_parallel` gives each copy with its halo (one collective-permute pair
  for q~, k~ and the value's shifted half, one for conv1's outputs); then `ring_attention`.
- decoding (a cache): keys (rotated) and values are written at rows end .. end + T - 1; the cache
  also carries the convolutions' inputs a chunk needs from before it: the last k1 - 1 rows of q~ and
  k~ (conv1), the last k2 - 1 rows of conv1's outputs (conv2) and the last row of x W_v_prev.

Defaults that are ours, not the paper's: conv_widths (2, 2); conv1 starts U[-k1^-1/2, k1^-1/2] (as
Mamba's), conv2 N(0, 1 / (k2 D)), the temperature g at 1.

Parameter budget (E = d_model): E D (Hq + 2 Hkv) + Hq D E + (k1 D + k2 D^2)(Hq + Hkv) + Hq (qk_norm).
KV cache per token 2 Hkv D numbers (MHA: 2 H D), plus per sequence D ((k1 - 1) + (k2 - 1))(Hq + Hkv)
+ Hkv D / 2 (value_shift).
"""

import math
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx
from pydantic import model_validator

from hybrax.layers.config import DType, Implementation, LayerConfig, itemsize
from hybrax.layers.embeddings import apply_rotary
from hybrax.layers.parameters import constant, logical_param, normal, uniform
from hybrax.layers.partitioned import dot_product_attention
from hybrax.layers.projection import project
from hybrax.layers.sequence_parallel.halo import short_causal_convs_sequence_parallel
from hybrax.layers.sequence_parallel.layout import seq_size
from hybrax.layers.softmax.ring_attention import ring_attention
from hybrax.layers.softmax.skeleton import append_to_cache, call_positions

F32 = jnp.float32
QUERY_AXES, KEY_AXES = ("heads", "head_dim"), ("kv_heads", "head_dim")


class CCAConfig(LayerConfig):
    """Parameter budget: see the module docstring."""

    kernel: ClassVar[str] = "attention"
    tiny: ClassVar[dict] = {"compression": 2, "kv_heads": 1}   # CCGQA: 2 latent query heads share 1 kv head

    d_model: int = 256
    num_heads: int = 4                  # the model's heads H (unset: model.num_heads)
    head_dim: int = 64                  # D, per latent head (unset: the model's head_dim)
    compression: int = 2                # C: Hq = H / C latent query heads (latent width E / C when E = H D)
    kv_heads: int | None = None         # Hkv, CCGQA's shared key/value heads (None: Hq, plain CCA)
    conv_widths: tuple[int, int] = (2, 2)   # (k1, k2): depthwise time conv, then time-and-channel conv
    qk_mean: bool = True                # add the mean of q~ and k~ to both after the convolutions
    value_shift: bool = True            # half of each value head reads the previous token
    qk_norm: bool = True                # L2-normalise q and k per head to sqrt(D), q times a learned g_h
    norm_eps: float = 1e-6              # inside the square root of qk_norm
    rope_theta: float = 10_000.0
    init_std: float = 0.02
    implementation: Implementation = None   # dot_product_attention implementation (unset: model.kernels)
    dtype: DType = "float32"
    param_dtype: DType = "float32"

    @model_validator(mode="after")
    def _check(self):
        if self.compression < 1 or min(self.conv_widths) < 1:
            raise ValueError(f"compression={self.compression} and conv_widths={self.conv_widths} must be >= 1")
        if "num_heads" not in self.model_fields_set:   # checked once the heads are known (set, or bound)
            return self
        if self.num_heads % self.compression:
            raise ValueError(f"compression={self.compression} does not divide num_heads={self.num_heads}")
        if self.kv_heads is not None and (self.kv_heads < 1 or self.latent_heads % self.kv_heads):
            raise ValueError(f"kv_heads={self.kv_heads} does not divide the latent query heads "
                             f"num_heads / compression = {self.latent_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even: rotary turns pairs of channels and the "
                             "value shift takes half of each value head")
        return self

    @property
    def latent_heads(self) -> int:
        """Hq = H / C."""
        return self.num_heads // self.compression

    @property
    def latent_kv_heads(self) -> int:
        """Hkv (kv_heads, or Hq when unset)."""
        return self.latent_heads if self.kv_heads is None else self.kv_heads

    def num_params(self) -> int:
        E, D, Hq, Hkv = self.d_model, self.head_dim, self.latent_heads, self.latent_kv_heads
        k1, k2 = self.conv_widths
        return E * D * (Hq + 2 * Hkv) + Hq * D * E + (k1 * D + k2 * D * D) * (Hq + Hkv) + Hq * self.qk_norm

    def flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token: every projection (2 per weight), conv2 (2 k2 D per channel) and conv1
        (2 k1 per channel) of q and k, plus q.k and weights.v over all `seq_len` keys (the dense kernels
        compute every score and mask afterwards, so the full square is counted, as AttentionConfig)."""
        E, D, Hq, Hkv = self.d_model, self.head_dim, self.latent_heads, self.latent_kv_heads
        k1, k2 = self.conv_widths
        projections = 2 * (E * D * (Hq + 2 * Hkv) + Hq * D * E)
        convolutions = 2 * (k1 + k2 * D) * D * (Hq + Hkv)
        return projections + convolutions + 4 * seq_len * Hq * D

    def kv_cache_bytes_per_token(self) -> float:
        """The rotated keys and the values: 2 Hkv D numbers of `dtype`."""
        return 2 * self.latent_kv_heads * self.head_dim * itemsize(self.dtype)

    def state_bytes_per_sequence(self) -> int:
        """The convolutions' carried rows (k1 - 1 and k2 - 1 of q and k) and the value shift's one row."""
        D, Hq, Hkv = self.head_dim, self.latent_heads, self.latent_kv_heads
        k1, k2 = self.conv_widths
        numbers = (k1 - 1 + k2 - 1) * (Hq + Hkv) * D + self.value_shift * Hkv * D // 2
        return numbers * itemsize(self.dtype)


# ---- delayed copies: delay_s(z)[t] = z[t - s], zero before the document ------------------------------

def _delays(z_BxTxHxD, count: int, segment_ids, state):
    """([delay_1(z), ..., delay_count(z)], the last `count` rows of [state; z]): rows before the chunk
    come from `state` [B, count, H, D] (zeros when None); a row of another segment is zero."""
    B, T = z_BxTxHxD.shape[:2]
    if state is None:
        state = jnp.zeros((B, count, *z_BxTxHxD.shape[2:]), z_BxTxHxD.dtype)
    padded = jnp.concatenate([state.astype(z_BxTxHxD.dtype), z_BxTxHxD], axis=1)
    seg_padded = None if segment_ids is None else jnp.pad(segment_ids, ((0, 0), (count, 0)), mode="edge")
    delayed = []
    for s in range(1, count + 1):
        z = padded[:, count - s:count - s + T]
        if segment_ids is not None:
            z = jnp.where((seg_padded[:, count - s:count - s + T] == segment_ids)[:, :, None, None], z, 0)
        delayed.append(z)
    return delayed, padded[:, T:]


def _delays_sequence_parallel(inputs, segment_ids) -> list[list[jax.Array]]:
    """[delay_1(z), ..., delay_n(z)] for each (z [B, T, H, D], channel names, n) under seq > 1, rows in
    zigzag order: delay_s is a causal conv of width W = max n + 1 whose weight is one-hot at tap
    W - 1 - s, so `short_causal_convs_sequence_parallel` brings each with its halo and document cuts."""
    width = 1 + max(n for _, _, n in inputs)
    convs = []
    for z, names, n in inputs:
        for s in range(1, n + 1):
            one_hot = jnp.zeros((width, *z.shape[2:]), z.dtype).at[width - 1 - s].set(1)
            convs.append((z, one_hot, jnp.zeros(z.shape[2:], z.dtype), names))
    outputs = iter(short_causal_convs_sequence_parallel(convs, segment_ids=segment_ids))
    return [[next(outputs) for _ in range(n)] for _, _, n in inputs]


def _taps(z_BxTxHxD, delayed) -> jax.Array:
    """[k, B, T, H, D]: tap i is z[t - k + 1 + i] (the order of the convolution weights)."""
    return jnp.stack([*reversed(delayed), z_BxTxHxD])


def _l2_normalise(z_BxTxHxD, eps: float) -> jax.Array:
    z = z_BxTxHxD.astype(F32)
    return z * jax.lax.rsqrt(jnp.sum(z * z, axis=-1, keepdims=True) + eps)


class CCA(nnx.Module):
    def __init__(self, config: CCAConfig, *, rngs: nnx.Rngs):
        c = self.config = config
        init = normal(c.init_std)
        E, D, Hq, Hkv = c.d_model, c.head_dim, c.latent_heads, c.latent_kv_heads
        k1, k2 = c.conv_widths
        self.w_q = logical_param(rngs, init, (E, Hq, D), c.param_dtype, ("embed", *QUERY_AXES))
        self.w_k = logical_param(rngs, init, (E, Hkv, D), c.param_dtype, ("embed", *KEY_AXES))
        self.w_v = logical_param(rngs, init, (E, Hkv, D), c.param_dtype, ("embed", *KEY_AXES))
        conv1_init, conv2_init = uniform(-k1 ** -0.5, k1 ** -0.5), normal((k2 * D) ** -0.5)
        self.conv1_q = logical_param(rngs, conv1_init, (k1, Hq, D), c.param_dtype, ("conv", *QUERY_AXES))
        self.conv1_k = logical_param(rngs, conv1_init, (k1, Hkv, D), c.param_dtype, ("conv", *KEY_AXES))
        self.conv2_q = logical_param(rngs, conv2_init, (k2, Hq, D, D), c.param_dtype, ("conv", *QUERY_AXES, None))
        self.conv2_k = logical_param(rngs, conv2_init, (k2, Hkv, D, D), c.param_dtype, ("conv", *KEY_AXES, None))
        if c.qk_norm:
            self.temperature = logical_param(rngs, constant(1.0), (Hq,), c.param_dtype, ("heads",))
        self.w_o = logical_param(rngs, init, (Hq, D, E), c.param_dtype, ("heads", "head_dim", "embed"))

    def _carried(self) -> dict[str, tuple[int, int, int]]:
        """Cache entry -> (rows, heads, width) of each carried input (entries with no rows left out)."""
        c = self.config
        D, Hq, Hkv = c.head_dim, c.latent_heads, c.latent_kv_heads
        k1, k2 = c.conv_widths
        shapes = {"conv1_q": (k1 - 1, Hq, D), "conv1_k": (k1 - 1, Hkv, D), "conv2_q": (k2 - 1, Hq, D),
                  "conv2_k": (k2 - 1, Hkv, D), "value_shift": (int(c.value_shift), Hkv, D // 2)}
        return {name: shape for name, shape in shapes.items() if shape[0]}

    def init_cache(self, batch: int, max_len: int) -> dict:
        """k (rotated), v [B, S, Hkv, D], end, and the carried convolution and value-shift inputs."""
        c = self.config
        shape = (batch, max_len, c.latent_kv_heads, c.head_dim)
        return {"k": jnp.zeros(shape, c.dtype), "v": jnp.zeros(shape, c.dtype), "end": jnp.zeros((), jnp.int32),
                **{name: jnp.zeros((batch, *rows_heads_width), c.dtype)
                   for name, rows_heads_width in self._carried().items()}}

    def _delayed(self, inputs: dict, segment_ids, cache, carried: dict) -> dict[str, list[jax.Array]]:
        """name -> [delay_1, ..., delay_n] of each (z, channel names, n), n = 0 left out; a cache gives the
        rows before the chunk and `carried` receives the new ones."""
        inputs = {name: entry for name, entry in inputs.items() if entry[2]}
        if not inputs:
            return {}
        if cache is None and seq_size() > 1:
            return dict(zip(inputs, _delays_sequence_parallel(list(inputs.values()), segment_ids)))
        delayed = {}
        for name, (z, _, n) in inputs.items():
            delayed[name], carried[name] = _delays(z, n, segment_ids, None if cache is None else cache[name])
        return delayed

    def __call__(self, x_BxTxE, *, segment_ids=None, positions=None, cache=None):
        c = self.config
        B, T, _ = x_BxTxE.shape
        D, G = c.head_dim, c.latent_heads // c.latent_kv_heads
        k1, k2 = c.conv_widths
        positions = call_positions(B, T, segment_ids, positions, cache)
        q_BxTxHxD = project("bte,ehd->bthd", x_BxTxE, self.w_q, c.dtype)   # q~, k~: the convolutions' inputs
        k_BxTxGxD = project("bte,ehd->bthd", x_BxTxE, self.w_k, c.dtype)
        v_BxTxGxD = project("bte,ehd->bthd", x_BxTxE, self.w_v, c.dtype)
        carried = {}
        delayed = self._delayed({"conv1_q": (q_BxTxHxD, QUERY_AXES, k1 - 1), "conv1_k": (k_BxTxGxD, KEY_AXES, k1 - 1),
                                 "value_shift": (v_BxTxGxD[..., D // 2:], KEY_AXES, int(c.value_shift))},
                                segment_ids, cache, carried)
        if c.value_shift:   # [x_t W_v_now | x_{t-1} W_v_prev]
            v_BxTxGxD = jnp.concatenate([v_BxTxGxD[..., :D // 2], delayed["value_shift"][0]], axis=-1)
        conv1 = lambda z, name, w: jnp.einsum(  # noqa: E731
            "kbthd,khd->bthd", _taps(z, delayed.get(name, [])).astype(F32), w[...].astype(F32)).astype(c.dtype)
        a_q_BxTxHxD = conv1(q_BxTxHxD, "conv1_q", self.conv1_q)
        a_k_BxTxGxD = conv1(k_BxTxGxD, "conv1_k", self.conv1_k)
        delayed = self._delayed({"conv2_q": (a_q_BxTxHxD, QUERY_AXES, k2 - 1),
                                 "conv2_k": (a_k_BxTxGxD, KEY_AXES, k2 - 1)}, segment_ids, cache, carried)
        conv2 = lambda z, name, w: project(  # noqa: E731
            "kbthd,khde->bthe", _taps(z, delayed.get(name, [])), w, c.dtype).astype(F32)
        mixed_q_BxTxHxD = conv2(a_q_BxTxHxD, "conv2_q", self.conv2_q)
        mixed_k_BxTxGxD = conv2(a_k_BxTxGxD, "conv2_k", self.conv2_k)
        if c.qk_mean:   # both get the mean of q~ and k~, each at its own head count
            q, k = q_BxTxHxD.astype(F32), k_BxTxGxD.astype(F32)
            mixed_q_BxTxHxD = mixed_q_BxTxHxD + (q + jnp.repeat(k, G, axis=2)) / 2
            mixed_k_BxTxGxD = mixed_k_BxTxGxD + (q.reshape(B, T, -1, G, D).mean(3) + k) / 2
        if c.qk_norm:
            g_Hx1 = self.temperature[...].astype(F32)[:, None]
            mixed_q_BxTxHxD = g_Hx1 * math.sqrt(D) * _l2_normalise(mixed_q_BxTxHxD, c.norm_eps)
            mixed_k_BxTxGxD = math.sqrt(D) * _l2_normalise(mixed_k_BxTxGxD, c.norm_eps)
        q_BxTxHxD = apply_rotary(mixed_q_BxTxHxD.astype(c.dtype), positions, c.rope_theta)
        k_BxTxGxD = apply_rotary(mixed_k_BxTxGxD.astype(c.dtype), positions, c.rope_theta)
        if cache is None:
            if seq_size() > 1:
                o_BxTxHxD = ring_attention(q_BxTxHxD, k_BxTxGxD, v_BxTxGxD, segment_ids=segment_ids,
                                           implementation=c.implementation)
            else:
                o_BxTxHxD = dot_product_attention(q_BxTxHxD, k_BxTxGxD, v_BxTxGxD, causal=True,
                                                  segment_ids=segment_ids, implementation=c.implementation)
            return project("bthd,hde->bte", o_BxTxHxD, self.w_o, c.dtype)
        end = cache["end"]
        k_BxSxGxD = append_to_cache(cache["k"], k_BxTxGxD, end)
        v_BxSxGxD = append_to_cache(cache["v"], v_BxTxGxD, end)
        visible_TxS = jnp.arange(k_BxSxGxD.shape[1])[None, :] <= (end + jnp.arange(T))[:, None]
        o_BxTxHxD = dot_product_attention(q_BxTxHxD, k_BxSxGxD, v_BxSxGxD, causal=False, mask=visible_TxS,
                                          implementation=c.implementation)
        y_BxTxE = project("bthd,hde->bte", o_BxTxHxD, self.w_o, c.dtype)
        return y_BxTxE, {"k": k_BxSxGxD, "v": v_BxSxGxD, "end": end + T,
                         **{name: tail.astype(c.dtype) for name, tail in carried.items()}}
