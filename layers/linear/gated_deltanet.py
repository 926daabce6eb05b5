"""Gated DeltaNet (Yang, Kautz & Hatamizadeh, 2024, "Gated Delta Networks: Improving Mamba2 with
Delta Rule"): a fast-weight memory written by the delta rule, with Mamba-2's decay.

    q, k = l2norm(silu(conv(x W_q))), l2norm(silu(conv(x W_k)))        [B, T, H, K]  (per head)
    v    = silu(conv(x W_v))                                          [B, T, H, V]
    beta = sigmoid(x W_beta)                                          [B, T, H]     (writing strength)
    g    = -exp(A_log) softplus(x W_a + dt_bias)                      [B, T, H]     (log-decay <= 0)
    S_t  = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t^T v_t,  o_t = K^-1/2 q_t S_t      S [B, H, K, V]
    y    = (RMSNorm_head(o) * silu(x W_gate)) W_out                    [B, T, d_model]

The convolutions are depthwise, width 4, without bias, as in the reference implementation; A and
dt start as in Mamba-2 (A ~ U[1, 16], dt ~ exp(U[log 1e-3, log 1e-1])). With unit keys and beta in
[0, 1] each transition I - beta k k^T is a contraction, so the state stays bounded without a
normaliser. Training runs the chunked op `pallas_kernels.delta_rule` (the WY representation);
under a mesh that splits `seq` the convolutions take their halos from the preceding chunk's
device (layers/sequence_parallel/halo.py) and the recurrence runs `delta_rule_sequence_parallel`
(one all-gather of each chunk's affine map per layer); decoding carries S and the last 3 inputs of
each convolution.

Parameter budget (d = d_model, H K = H V = d by default, W = 4): W_q, W_k, W_v, W_gate, W_out d^2 each,
W_beta and W_a d H each, A_log and dt_bias H each, convolutions W (2 H K + H V), norm H V:
5 d^2 + 2 H (d + 1) + 13 d.
"""

from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from hybrax.layers.config import DType, Implementation, LayerConfig, ModelShape, itemsize
from hybrax.layers.linear.delta_rule_parallel import delta_rule_sequence_parallel
from hybrax.layers.linear.group_norm import HeadRMSNorm
from hybrax.layers.linear.linear_recurrence import check_decoding
from hybrax.layers.parameters import dt_bias, log_uniform, logical_param, normal, uniform
from hybrax.layers.partitioned import delta_rule
from hybrax.layers.projection import project
from hybrax.layers.sequence_parallel.halo import short_causal_convs_sequence_parallel
from hybrax.layers.sequence_parallel.layout import seq_size
from hybrax.layers.short_conv import short_causal_conv


class GatedDeltaNetConfig(LayerConfig):
    kernel: ClassVar[str] = "delta_rule"
    tiny: ClassVar[dict] = {"chunk_size": 5}   # the conformance suite's 13 tokens cross chunks

    d_model: int = 256
    num_heads: int = 4                  # heads (unset: model.num_heads)
    key_dim: int | None = None          # query/key width per head (None: the model's head_dim)
    value_dim: int | None = None        # value width per head (None: the model's head_dim)
    conv_width: int = 4                 # width of the short causal convolutions on q, k, v
    dt_min: float = 1e-3                # initial decay time step dt ~ exp(U[log dt_min, log dt_max])
    dt_max: float = 1e-1
    chunk_size: int = 64                # tokens per chunk of the chunked recurrence
    norm_eps: float = 1e-5              # epsilon of the per-head output RMSNorm and of the q/k L2 norms
    init_std: float = 0.02
    implementation: Implementation = None   # delta_rule implementation (unset: model.kernels.delta_rule)
    dtype: DType = "float32"
    param_dtype: DType = "float32"

    def derived(self, shape: ModelShape) -> dict:
        return {"key_dim": shape.head_dim, "value_dim": shape.head_dim}

    def num_params(self) -> int:
        d, H, HK, HV, W = self.d_model, self.num_heads, self.num_heads * self.key_dim, \
            self.num_heads * self.value_dim, self.conv_width
        return d * (2 * HK + 2 * HV) + 2 * d * H + 2 * H + W * (2 * HK + HV) + HV + HV * d

    def state_bytes_per_sequence(self) -> int:
        """The state [H, K, V] (float32) and the last W - 1 convolution inputs of q, k and v."""
        H, K, V, W = self.num_heads, self.key_dim, self.value_dim, self.conv_width
        return H * K * V * 4 + (W - 1) * H * (2 * K + V) * itemsize(self.dtype)

    def flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token: projections, convolutions and the chunked delta rule as the
        op's xla implementation runs it. Per head and token, with C = min(chunk, T) and P the power
        of two >= C: the key Gram matrix C K; the inverse of the unit-triangular I + A by recursive
        doubling, P (P^2 - 1) / 3 per chunk; the inverse times [beta k, beta v], C (K + V); the
        intra-chunk scores C K and their product with the corrected values C V; three K x V
        products (W S and the state update inside the scan over chunks, q S after it).
        Elementwise work is not counted."""
        d, H, K, V, W = self.d_model, self.num_heads, self.key_dim, self.value_dim, self.conv_width
        C = min(self.chunk_size, seq_len)
        P = 1 << (C - 1).bit_length()
        projections = 2 * (d * H * (2 * K + 2 * V) + 2 * d * H + H * V * d)
        conv = 2 * W * H * (2 * K + V)
        per_head = 3 * C * K + 2 * C * V + 3 * K * V + P * (P * P - 1) / (3 * C)
        return projections + conv + round(H * 2 * per_head)


def _l2_normalise(x_BxTxHxK, eps: float):
    x = x_BxTxHxK.astype(jnp.float32)
    return (x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)).astype(x_BxTxHxK.dtype)


def delta_rule_step(q_BxHxK, k_BxHxK, v_BxHxV, beta_BxH, log_decay_BxH, state_BxHxKxV, scale: float):
    """One step of the gated delta rule (decoding), written from the formula, independently of the
    op; returns (o `[B, H, V]` float32, new float32 state)."""
    f32 = jnp.float32
    q, k, v = q_BxHxK.astype(f32), k_BxHxK.astype(f32), v_BxHxV.astype(f32)
    state = jnp.exp(log_decay_BxH)[..., None, None] * state_BxHxKxV.astype(f32)
    read_BxHxV = jnp.einsum("bhk,bhkv->bhv", k, state)
    state = state + beta_BxH[..., None, None] * k[..., :, None] * (v - read_BxHxV)[..., None, :]
    return scale * jnp.einsum("bhk,bhkv->bhv", q, state), state


class GatedDeltaNet(nnx.Module):
    def __init__(self, config: GatedDeltaNetConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        init = normal(c.init_std)
        H, K, V, W, d = c.num_heads, c.key_dim, c.value_dim, c.conv_width, c.d_model
        head_axes = ("embed", "heads", "head_dim")
        self.w_q = logical_param(rngs, init, (d, H, K), c.param_dtype, head_axes)
        self.w_k = logical_param(rngs, init, (d, H, K), c.param_dtype, head_axes)
        self.w_v = logical_param(rngs, init, (d, H, V), c.param_dtype, head_axes)
        self.w_gate = logical_param(rngs, init, (d, H, V), c.param_dtype, head_axes)
        self.w_beta = logical_param(rngs, init, (d, H), c.param_dtype, ("embed", "heads"))
        self.w_a = logical_param(rngs, init, (d, H), c.param_dtype, ("embed", "heads"))
        self.a_log = logical_param(rngs, log_uniform(1.0, 16.0), (H,), c.param_dtype, ("heads",))
        self.dt_bias = logical_param(rngs, dt_bias(c.dt_min, c.dt_max), (H,), c.param_dtype, ("heads",))
        conv_init = uniform(-W ** -0.5, W ** -0.5)
        conv_axes = ("conv", "heads", "head_dim")
        self.conv_q = logical_param(rngs, conv_init, (W, H, K), c.param_dtype, conv_axes)
        self.conv_k = logical_param(rngs, conv_init, (W, H, K), c.param_dtype, conv_axes)
        self.conv_v = logical_param(rngs, conv_init, (W, H, V), c.param_dtype, conv_axes)
        self.norm = HeadRMSNorm(H, V, eps=c.norm_eps, dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        self.w_out = logical_param(rngs, init, (H, V, d), c.param_dtype, ("heads", "head_dim", "embed"))

    def init_cache(self, batch: int, max_len: int) -> dict:
        """The state `[B, H, K, V]` float32 and the last W - 1 inputs of each convolution."""
        del max_len
        c = self.config
        H, K, V, W = c.num_heads, c.key_dim, c.value_dim, c.conv_width
        tail = lambda D: jnp.zeros((batch, W - 1, H, D), c.dtype)  # noqa: E731
        return {"state": jnp.zeros((batch, H, K, V), jnp.float32), "conv_q": tail(K), "conv_k": tail(K),
                "conv_v": tail(V)}

    def __call__(self, x_BxTxD, *, segment_ids=None, positions=None, cache=None):
        del positions  # the convolutions and the decay carry the order
        c = self.config
        check_decoding(segment_ids, cache)
        decoding = cache is not None
        cache = cache if decoding else {}
        convs = [(project("btd,dhk->bthk", x_BxTxD, weight, c.dtype), conv[...], name)
                 for weight, conv, name in ((self.w_q, self.conv_q, "conv_q"), (self.w_k, self.conv_k, "conv_k"),
                                            (self.w_v, self.conv_v, "conv_v"))]
        no_bias = lambda conv: jnp.zeros(conv.shape[1:], conv.dtype)  # noqa: E731
        tails = {}
        if not decoding and seq_size() > 1:  # chunks of T sit on other devices: fetch each one's halo
            q, k, v = short_causal_convs_sequence_parallel(
                [(x, conv, no_bias(conv), ("heads", "head_dim")) for x, conv, _ in convs], segment_ids=segment_ids)
        else:
            outputs = []
            for x, conv, name in convs:
                y, tails[name] = short_causal_conv(x, conv, no_bias(conv), segment_ids=segment_ids,
                                                   state=cache.get(name))
                outputs.append(y)
            q, k, v = outputs
        q_BxTxHxK = _l2_normalise(jax.nn.silu(q), c.norm_eps)
        k_BxTxHxK = _l2_normalise(jax.nn.silu(k), c.norm_eps)
        v_BxTxHxV = jax.nn.silu(v)
        f32 = jnp.float32
        beta_BxTxH = jax.nn.sigmoid(project("btd,dh->bth", x_BxTxD, self.w_beta, c.dtype).astype(f32))
        dt_BxTxH = jax.nn.softplus(project("btd,dh->bth", x_BxTxD, self.w_a, c.dtype).astype(f32)
                                   + self.dt_bias[...].astype(f32))
        log_decay_BxTxH = -jnp.exp(self.a_log[...].astype(f32)) * dt_BxTxH
        scale = c.key_dim ** -0.5
        options = {"scale": scale, "chunk_size": c.chunk_size, "implementation": c.implementation}
        state = cache.get("state")
        if not decoding and seq_size() > 1:
            o_BxTxHxV = delta_rule_sequence_parallel(q_BxTxHxK, k_BxTxHxK, v_BxTxHxV, beta_BxTxH, log_decay_BxTxH,
                                                     segment_ids=segment_ids, **options)
        elif not decoding:
            o_BxTxHxV, _ = delta_rule(q_BxTxHxK, k_BxTxHxK, v_BxTxHxV, beta_BxTxH, log_decay_BxTxH,
                                      segment_ids=segment_ids, **options)
        elif x_BxTxD.shape[1] == 1:
            o_BxHxV, state = delta_rule_step(q_BxTxHxK[:, 0], k_BxTxHxK[:, 0], v_BxTxHxV[:, 0], beta_BxTxH[:, 0],
                                             log_decay_BxTxH[:, 0], state, scale)
            o_BxTxHxV = o_BxHxV[:, None].astype(v_BxTxHxV.dtype)
        else:  # a prefill: the chunked op from the cached state
            o_BxTxHxV, state = delta_rule(q_BxTxHxK, k_BxTxHxK, v_BxTxHxV, beta_BxTxH, log_decay_BxTxH,
                                          initial_state=state, return_final_state=True, **options)
        gate_BxTxHxV = project("btd,dhv->bthv", x_BxTxD, self.w_gate, c.dtype)
        gated_BxTxHxV = self.norm(o_BxTxHxV) * jax.nn.silu(gate_BxTxHxV.astype(f32)).astype(c.dtype)
        y_BxTxD = project("bthv,hvd->btd", gated_BxTxHxV, self.w_out, c.dtype)
        return y_BxTxD if not decoding else (y_BxTxD, {"state": state, **tails})
