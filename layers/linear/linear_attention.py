"""Lightning Attention, the linear attention of TransNormerLLM (Qin et al., 2023), with fixed
per-head decay.

    q = silu(x W_q), k = silu(x W_k), v = x W_v, u = x W_u            [B, T, H, K]
    S_t = lambda_h S_{t-1} + k_t^T v_t,  o_t = K^-1/2 q_t S_t           S [B, H, K, K], float32
    y = (RMSNorm_head(o) * silu(u)) W_o                                 [B, T, d_model]

The decay rates are fixed per head, lambda_h = 1 - 2^(-5 - h) for h = 0 .. H-1 (the RetNet
schedule, also the head-wise slopes of TransNormerLLM without the layer term), so heads range from
short (~32 tokens) to long memory. `decay=False` gives the decay-free variant (lambda = 1, plain
causal linear attention). The output normalisation is a per-head RMSNorm, which replaces softmax's
normaliser and keeps the output scale independent of the sequence length.

Parameter budget: 5 d_model H K (W_q, W_k, W_v, W_u and W_o) + H K (norm scale).
"""

from typing import ClassVar
import math

import jax
import jax.numpy as jnp
from flax import nnx

from hybrax.layers.config import DType, Implementation, LayerConfig
from hybrax.layers.linear.group_norm import HeadRMSNorm
from hybrax.layers.linear.linear_recurrence import check_decoding, chunked_flops_per_token, initial_state, mix
from hybrax.layers.parameters import logical_param, normal
from hybrax.layers.projection import project


class LinearAttentionConfig(LayerConfig):
    kernel: ClassVar[str] = "linear_attention"
    tiny: ClassVar[dict] = {"chunk_size": 5}   # the conformance suite's 13 tokens cross chunks

    d_model: int = 256
    num_heads: int = 4                  # heads (unset: model.num_heads)
    head_dim: int = 64                  # key and value width per head (unset: the model's head_dim)
    decay: bool = True                  # Lightning's fixed per-head decay log(1 - 2^(-5 - h)); False: none
    chunk_size: int = 64                # tokens per chunk of the chunked recurrence
    norm_eps: float = 1e-5              # epsilon of the per-head output RMSNorm
    init_std: float = 0.02
    implementation: Implementation = None   # linear_attention implementation (unset: model.kernels)
    dtype: DType = "float32"
    param_dtype: DType = "float32"

    def num_params(self) -> int:
        width = self.num_heads * self.head_dim
        return 5 * self.d_model * width + width

    def state_bytes_per_sequence(self) -> int:
        """The state S [H, D, D], float32."""
        return self.num_heads * self.head_dim * self.head_dim * 4

    def flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token: the five projections plus the chunked recurrence (matmuls only)."""
        H, K = self.num_heads, self.head_dim
        return 2 * 5 * self.d_model * H * K + chunked_flops_per_token(H, K, K, seq_len, self.chunk_size)

    def log_decay_rates(self) -> jnp.ndarray:
        """log lambda_h, `[H]` float32: log(1 - 2^(-5 - h))."""
        return jnp.asarray([math.log1p(-(2.0 ** (-5 - h))) for h in range(self.num_heads)], jnp.float32)


class LinearAttention(nnx.Module):
    def __init__(self, config: LinearAttentionConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        init = normal(c.init_std)
        shape, axes = (c.d_model, c.num_heads, c.head_dim), ("embed", "heads", "head_dim")
        self.w_q = logical_param(rngs, init, shape, c.param_dtype, axes)
        self.w_k = logical_param(rngs, init, shape, c.param_dtype, axes)
        self.w_v = logical_param(rngs, init, shape, c.param_dtype, axes)
        self.w_u = logical_param(rngs, init, shape, c.param_dtype, axes)
        self.w_o = logical_param(rngs, init, (c.num_heads, c.head_dim, c.d_model), c.param_dtype,
                                 ("heads", "head_dim", "embed"))
        self.norm = HeadRMSNorm(c.num_heads, c.head_dim, eps=c.norm_eps, dtype=c.dtype, param_dtype=c.param_dtype,
                                rngs=rngs)

    def init_cache(self, batch: int, max_len: int) -> dict:
        """The recurrent state `[B, H, K, K]` float32; independent of `max_len`."""
        del max_len
        c = self.config
        return {"state": initial_state(batch, c.num_heads, c.head_dim, c.head_dim)}

    def __call__(self, x_BxTxD, *, segment_ids=None, positions=None, cache=None):
        del positions  # the decay carries the order; no position embedding
        c = self.config
        check_decoding(segment_ids, cache)
        B, T, _ = x_BxTxD.shape
        q_BxTxHxK = jax.nn.silu(project("btd,dhk->bthk", x_BxTxD, self.w_q, c.dtype))
        k_BxTxHxK = jax.nn.silu(project("btd,dhk->bthk", x_BxTxD, self.w_k, c.dtype))
        v_BxTxHxK = project("btd,dhk->bthk", x_BxTxD, self.w_v, c.dtype)
        u_BxTxHxK = project("btd,dhk->bthk", x_BxTxD, self.w_u, c.dtype)
        log_decay_BxTxH = None
        if c.decay:
            log_decay_BxTxH = jnp.broadcast_to(c.log_decay_rates(), (B, T, c.num_heads))
        o_BxTxHxK, state = mix(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, log_decay_BxTxH, scale=c.head_dim ** -0.5,
                               segment_ids=segment_ids, state=None if cache is None else cache["state"],
                               chunk_size=c.chunk_size, implementation=c.implementation)
        gated_BxTxHxK = self.norm(o_BxTxHxK) * jax.nn.silu(u_BxTxHxK)
        y_BxTxD = project("bthk,hkd->btd", gated_BxTxHxK, self.w_o, c.dtype)
        return y_BxTxD if cache is None else (y_BxTxD, {"state": state})
