"""Mamba-2 (Dao & Gu, 2024, "Transformers are SSMs"): the SSD layer as scalar-decay linear attention.

    z, x = x_in W_z, x_in W_x     [B, T, H, P]       (H P = expand * d_model, P = head_dim)
    b, c = x_in W_B, x_in W_C     [B, T, N]          (one group: shared by all heads)
    dt   = x_in W_dt              [B, T, H]
    x, b, c = silu(short_causal_conv(.))             (depthwise, width 4)
    dt = softplus(dt + dt_bias),  A = -exp(A_log)    [H]
    S_t = exp(dt_t A) S_{t-1} + b_t^T (dt_t x_t),  o_t = c_t S_t        S [B, H, N, P] float32
    y = (RMSNorm(( o + D x ) * silu(z))) W_out       (gated RMSNorm over all H P channels)

This is `linear_attention(q=c, k=b, v=dt * x, log_decay=dt * A, scale=1)`. Decoding carries S and
the last 3 inputs of each convolution. Under a mesh that splits `seq`, the convolutions take their
first inputs from the preceding chunk's device (layers/sequence_parallel/halo.py) and the
recurrence runs LASP-2 (`mix`). Initialisation follows the reference implementation:
dt = exp(U[log 1e-3, log 1e-1]) through the inverse softplus, A = -U[1, 16], D = 1, the conv
weights U[-1/2, 1/2] (PyTorch's default for fan-in 4).

Parameter budget (d = d_model, E = H P, W = 4): in-projection d (2E + 2N + H), convolution
(W + 1)(E + 2N), dt_bias, A_log, D 3H, norm E, out-projection E d.
"""

from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from hybrax.layers.config import DType, Implementation, LayerConfig, ModelShape, itemsize
from hybrax.layers.linear.group_norm import HeadRMSNorm
from hybrax.layers.linear.linear_recurrence import check_decoding, chunked_flops_per_token, initial_state, mix
from hybrax.layers.parameters import dt_bias, log_uniform, logical_param, normal, ones, uniform
from hybrax.layers.projection import project
from hybrax.layers.sequence_parallel.halo import short_causal_convs_sequence_parallel
from hybrax.layers.sequence_parallel.layout import seq_size
from hybrax.layers.short_conv import short_causal_conv


class Mamba2Config(LayerConfig):
    kernel: ClassVar[str] = "linear_attention"
    tiny: ClassVar[dict] = {"chunk_size": 5}   # the conformance suite's 13 tokens cross chunks

    d_model: int = 256
    expand: int = 2                     # inner width E = expand * d_model (sets num_heads when None)
    head_dim: int = 64                  # P (unset: the model's head_dim)
    num_heads: int | None = None        # H (None: expand * d_model / head_dim)
    state_dim: int = 128                # N
    conv_width: int = 4                 # width of the short causal convolutions
    dt_min: float = 1e-3                # initial dt ~ exp(U[log dt_min, log dt_max])
    dt_max: float = 1e-1
    chunk_size: int = 64                # tokens per chunk of the chunked recurrence
    norm_eps: float = 1e-5              # epsilon of the gated RMSNorm
    init_std: float = 0.02
    implementation: Implementation = None   # linear_attention implementation (unset: model.kernels)
    dtype: DType = "float32"
    param_dtype: DType = "float32"

    def derived(self, shape: ModelShape) -> dict:
        head_dim = self.head_dim if "head_dim" in self.model_fields_set else shape.head_dim
        if self.expand * shape.d_model % head_dim:
            raise ValueError(f"head_dim={head_dim} does not divide expand * d_model = {self.expand * shape.d_model}")
        return {"num_heads": self.expand * shape.d_model // head_dim}

    @property
    def inner(self) -> int:
        return self.num_heads * self.head_dim

    def num_params(self) -> int:
        d, E, N, H, W = self.d_model, self.inner, self.state_dim, self.num_heads, self.conv_width
        return d * (2 * E + 2 * N + H) + (W + 1) * (E + 2 * N) + 3 * H + E + E * d

    def state_bytes_per_sequence(self) -> int:
        """The state [H, N, P] (float32) and the last W - 1 convolution inputs of x, B and C."""
        H, P, N, W = self.num_heads, self.head_dim, self.state_dim, self.conv_width
        return H * N * P * 4 + (W - 1) * (H * P + 2 * N) * itemsize(self.dtype)

    def flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token: the projections, the depthwise convolution and the chunked
        recurrence (matmul-like work only)."""
        d, E, N, H, W = self.d_model, self.inner, self.state_dim, self.num_heads, self.conv_width
        projections = 2 * (d * (2 * E + 2 * N + H) + E * d)
        conv = 2 * W * (E + 2 * N)
        return projections + conv + chunked_flops_per_token(H, N, self.head_dim, seq_len, self.chunk_size)


class Mamba2(nnx.Module):
    def __init__(self, config: Mamba2Config, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        init = normal(c.init_std)
        H, P, N, W, d = c.num_heads, c.head_dim, c.state_dim, c.conv_width, c.d_model
        head_axes = ("embed", "heads", "head_dim")
        self.w_z = logical_param(rngs, init, (d, H, P), c.param_dtype, head_axes)
        self.w_x = logical_param(rngs, init, (d, H, P), c.param_dtype, head_axes)
        # B and C are the keys and queries of the op: N plays the role of a (shared) head_dim
        self.w_b = logical_param(rngs, init, (d, N), c.param_dtype, ("embed", "head_dim"))
        self.w_c = logical_param(rngs, init, (d, N), c.param_dtype, ("embed", "head_dim"))
        self.w_dt = logical_param(rngs, init, (d, H), c.param_dtype, ("embed", "heads"))
        conv_init, bound = uniform(-W ** -0.5, W ** -0.5), W ** -0.5
        self.conv_x = logical_param(rngs, conv_init, (W, H, P), c.param_dtype, ("conv", "heads", "head_dim"))
        self.conv_x_bias = logical_param(rngs, uniform(-bound, bound), (H, P), c.param_dtype, ("heads", "head_dim"))
        self.conv_b = logical_param(rngs, conv_init, (W, N), c.param_dtype, ("conv", "head_dim"))
        self.conv_b_bias = logical_param(rngs, uniform(-bound, bound), (N,), c.param_dtype, ("head_dim",))
        self.conv_c = logical_param(rngs, conv_init, (W, N), c.param_dtype, ("conv", "head_dim"))
        self.conv_c_bias = logical_param(rngs, uniform(-bound, bound), (N,), c.param_dtype, ("head_dim",))
        self.dt_bias = logical_param(rngs, dt_bias(c.dt_min, c.dt_max), (H,), c.param_dtype, ("heads",))
        self.a_log = logical_param(rngs, log_uniform(1.0, 16.0), (H,), c.param_dtype, ("heads",))
        self.d_skip = logical_param(rngs, ones(), (H,), c.param_dtype, ("heads",))
        self.norm = HeadRMSNorm(H, P, per_head=False, eps=c.norm_eps, dtype=c.dtype, param_dtype=c.param_dtype,
                                rngs=rngs)
        self.w_out = logical_param(rngs, init, (H, P, d), c.param_dtype, ("heads", "head_dim", "embed"))

    def init_cache(self, batch: int, max_len: int) -> dict:
        """The SSM state `[B, H, N, P]` float32 and the last W - 1 conv inputs of x, B and C."""
        del max_len
        c = self.config
        H, P, N, W, dtype = c.num_heads, c.head_dim, c.state_dim, c.conv_width, c.dtype
        return {"state": initial_state(batch, H, N, P),
                "conv_x": jnp.zeros((batch, W - 1, H, P), dtype),
                "conv_b": jnp.zeros((batch, W - 1, N), dtype),
                "conv_c": jnp.zeros((batch, W - 1, N), dtype)}

    def __call__(self, x_BxTxD, *, segment_ids=None, positions=None, cache=None):
        del positions  # the convolution and the decay carry the order
        c = self.config
        B, T, _ = x_BxTxD.shape
        H, N = c.num_heads, c.state_dim
        check_decoding(segment_ids, cache)
        decoding = cache is not None
        cache = cache if decoding else {}
        z_BxTxHxP = project("btd,dhp->bthp", x_BxTxD, self.w_z, c.dtype)
        conv_inputs = [(project("btd,dhp->bthp", x_BxTxD, self.w_x, c.dtype), self.conv_x[...], self.conv_x_bias[...],
                        ("heads", "head_dim"), "conv_x"),
                       (project("btd,dn->btn", x_BxTxD, self.w_b, c.dtype), self.conv_b[...], self.conv_b_bias[...],
                        ("head_dim",), "conv_b"),
                       (project("btd,dn->btn", x_BxTxD, self.w_c, c.dtype), self.conv_c[...], self.conv_c_bias[...],
                        ("head_dim",), "conv_c")]
        if not decoding and seq_size() > 1:  # chunks of T sit on other devices: fetch each one's halo
            x_BxTxHxP, b_BxTxN, c_BxTxN = short_causal_convs_sequence_parallel(
                [conv[:4] for conv in conv_inputs], segment_ids=segment_ids)
        else:
            (x_BxTxHxP, conv_x), (b_BxTxN, conv_b), (c_BxTxN, conv_c) = (
                short_causal_conv(x, weight, bias, segment_ids=segment_ids, state=cache.get(name))
                for x, weight, bias, _, name in conv_inputs)
        x_BxTxHxP, b_BxTxN, c_BxTxN = jax.nn.silu(x_BxTxHxP), jax.nn.silu(b_BxTxN), jax.nn.silu(c_BxTxN)
        f32 = jnp.float32
        dt_BxTxH = project("btd,dh->bth", x_BxTxD, self.w_dt, c.dtype).astype(f32)
        dt_BxTxH = jax.nn.softplus(dt_BxTxH + self.dt_bias[...].astype(f32))
        log_decay_BxTxH = -jnp.exp(self.a_log[...].astype(f32)) * dt_BxTxH
        v_BxTxHxP = (x_BxTxHxP.astype(f32) * dt_BxTxH[..., None]).astype(x_BxTxHxP.dtype)
        q_BxTxHxN = jnp.broadcast_to(c_BxTxN[:, :, None], (B, T, H, N))
        k_BxTxHxN = jnp.broadcast_to(b_BxTxN[:, :, None], (B, T, H, N))
        o_BxTxHxP, state = mix(q_BxTxHxN, k_BxTxHxN, v_BxTxHxP, log_decay_BxTxH, scale=1.0, segment_ids=segment_ids,
                               state=cache.get("state"), chunk_size=c.chunk_size, implementation=c.implementation)
        o_BxTxHxP = o_BxTxHxP.astype(f32) + self.d_skip[...].astype(f32)[:, None] * x_BxTxHxP.astype(f32)
        y_BxTxD = project("bthp,hpd->btd", self.norm(o_BxTxHxP, z_BxTxHxP), self.w_out, c.dtype)
        if not decoding:
            return y_BxTxD
        return y_BxTxD, {"state": state, "conv_x": conv_x, "conv_b": conv_b, "conv_c": conv_c}
