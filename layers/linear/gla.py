"""Gated Linear Attention (Yang, Wang, Shen, Panda & Kim, 2023, "Gated Linear Attention
Transformers with Hardware-Efficient Training"): linear attention with a data-dependent
per-key-channel forget gate.

    q = x W_q, k = x W_k                         [B, T, H, K]   (K = d_model / (2 H): expand_k 1/2)
    v = x W_v, r = x W_r                         [B, T, H, V]   (V = d_model / H:     expand_v 1)
    g = logsigmoid(x W_1 W_2 + b) / 16           [B, T, H, K]   (rank-16 gate, normaliser 16)
    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,  o_t = K^-1/2 q_t S_t      S [B, H, K, V] float32
    y = (RMSNorm_head(o) * swish(r)) W_o         [B, T, d_model]

Parameter budget (d = d_model, with the defaults H K = d/2, H V = d, rank 16):
    W_q, W_k: 2 d H K = d^2;  W_v, W_r, W_o: 3 d H V = 3 d^2;  gate: 16 d + 16 H K + H K;  norm: H V
    = 4 d^2 + 25.5 d in all, the 4 d^2 of multi-head softmax attention plus a small gate.
"""

from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from hybrax.layers.config import DType, Implementation, LayerConfig, ModelShape
from hybrax.layers.linear.group_norm import HeadRMSNorm
from hybrax.layers.linear.linear_recurrence import check_decoding, chunked_flops_per_token, initial_state, mix
from hybrax.layers.parameters import logical_param, normal
from hybrax.layers.projection import project


class GLAConfig(LayerConfig):
    kernel: ClassVar[str] = "linear_attention"
    tiny: ClassVar[dict] = {"chunk_size": 5}   # the conformance suite's 13 tokens cross chunks

    d_model: int = 256
    num_heads: int = 4                  # heads (unset: model.num_heads)
    key_dim: int | None = None          # per head (None: half the model's head_dim, GLA's expand_k 1/2)
    value_dim: int | None = None        # per head (None: the model's head_dim, expand_v 1)
    gate_rank: int = 16                 # rank of the low-rank forget-gate projection
    gate_normaliser: float = 16.0       # the log-gate is divided by this (GLA's 16)
    chunk_size: int = 64                # tokens per chunk of the chunked recurrence
    norm_eps: float = 1e-5              # epsilon of the per-head output RMSNorm
    init_std: float = 0.02
    implementation: Implementation = None   # linear_attention implementation (unset: model.kernels)
    dtype: DType = "float32"
    param_dtype: DType = "float32"

    def derived(self, shape: ModelShape) -> dict:
        return {"key_dim": shape.head_dim // 2, "value_dim": shape.head_dim}

    def num_params(self) -> int:
        d, HK, HV, r = self.d_model, self.num_heads * self.key_dim, self.num_heads * self.value_dim, self.gate_rank
        return 2 * d * HK + 3 * d * HV + (d * r + r * HK + HK) + HV

    def state_bytes_per_sequence(self) -> int:
        """The state S [H, K, V], float32."""
        return self.num_heads * self.key_dim * self.value_dim * 4

    def flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token: the projections, the low-rank gate and the chunked recurrence
        with its per-channel decay (see `chunked_flops_per_token`); elementwise work is not counted."""
        d, HK, HV, r = self.d_model, self.num_heads * self.key_dim, self.num_heads * self.value_dim, self.gate_rank
        projections = 2 * (2 * d * HK + 3 * d * HV + d * r + r * HK)
        return projections + chunked_flops_per_token(self.num_heads, self.key_dim, self.value_dim, seq_len,
                                                     self.chunk_size)


class GLA(nnx.Module):
    def __init__(self, config: GLAConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        init = normal(c.init_std)
        H, K, V = c.num_heads, c.key_dim, c.value_dim
        self.w_q = logical_param(rngs, init, (c.d_model, H, K), c.param_dtype, ("embed", "heads", "head_dim"))
        self.w_k = logical_param(rngs, init, (c.d_model, H, K), c.param_dtype, ("embed", "heads", "head_dim"))
        self.w_v = logical_param(rngs, init, (c.d_model, H, V), c.param_dtype, ("embed", "heads", "head_dim"))
        self.w_r = logical_param(rngs, init, (c.d_model, H, V), c.param_dtype, ("embed", "heads", "head_dim"))
        self.w_gate_down = logical_param(rngs, init, (c.d_model, c.gate_rank), c.param_dtype, ("embed", "low_rank"))
        self.w_gate_up = logical_param(rngs, init, (c.gate_rank, H, K), c.param_dtype,
                                       ("low_rank", "heads", "head_dim"))
        self.gate_bias = logical_param(rngs, jax.nn.initializers.zeros, (H, K), c.param_dtype, ("heads", "head_dim"))
        self.w_o = logical_param(rngs, init, (H, V, c.d_model), c.param_dtype, ("heads", "head_dim", "embed"))
        self.norm = HeadRMSNorm(H, V, eps=c.norm_eps, dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)

    def init_cache(self, batch: int, max_len: int) -> dict:
        """The recurrent state `[B, H, K, V]` float32; independent of `max_len`."""
        del max_len
        c = self.config
        return {"state": initial_state(batch, c.num_heads, c.key_dim, c.value_dim)}

    def __call__(self, x_BxTxD, *, segment_ids=None, positions=None, cache=None):
        del positions  # the gates carry the order; no position embedding
        c = self.config
        check_decoding(segment_ids, cache)
        q_BxTxHxK = project("btd,dhk->bthk", x_BxTxD, self.w_q, c.dtype)
        k_BxTxHxK = project("btd,dhk->bthk", x_BxTxD, self.w_k, c.dtype)
        v_BxTxHxV = project("btd,dhv->bthv", x_BxTxD, self.w_v, c.dtype)
        r_BxTxHxV = project("btd,dhv->bthv", x_BxTxD, self.w_r, c.dtype)
        low_BxTxR = project("btd,dr->btr", x_BxTxD, self.w_gate_down, c.dtype)
        gate_logit = project("btr,rhk->bthk", low_BxTxR, self.w_gate_up, c.dtype).astype(jnp.float32)
        # the log-gate stays float32: it is summed over the chunk inside the op
        log_decay_BxTxHxK = jax.nn.log_sigmoid(gate_logit + self.gate_bias[...].astype(jnp.float32)) / c.gate_normaliser
        o_BxTxHxV, state = mix(q_BxTxHxK, k_BxTxHxK, v_BxTxHxV, log_decay_BxTxHxK, scale=c.key_dim ** -0.5,
                               segment_ids=segment_ids, state=None if cache is None else cache["state"],
                               chunk_size=c.chunk_size, implementation=c.implementation)
        gated_BxTxHxV = self.norm(o_BxTxHxV) * jax.nn.silu(r_BxTxHxV)
        y_BxTxD = project("bthv,hvd->btd", gated_BxTxHxV, self.w_o, c.dtype)
        return y_BxTxD if cache is None else (y_BxTxD, {"state": state})
