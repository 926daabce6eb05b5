"""Causal softmax attention with grouped-query heads (Ainslie et al., 2023) and rotary positions.

    q = x W_q, k = x W_k, v = x W_v  (rotary applied to q and k at `positions`)
    o = softmax(q k^T / sqrt(D) + causal/segment mask) v,  y = o W_o

Shapes: x [B, T, d_model]; q [B, T, H, D]; k, v [B, T, Hkv, D] with H a multiple of Hkv.
Decoding keeps a KV cache of fixed length (`init_cache`); each call appends its keys and values.
With `sparse_prefill` set (a name in `layers.sparse.prefill.SELECTORS`), the no-cache path lets that
training-free selector list key blocks and runs `block_sparse_attention` over them; decoding with a
cache stays dense.
Under a mesh with seq > 1 the dense no-cache path is ring attention (`layers.sequence_parallel`):
x, segment_ids and positions come in zigzag order, split over seq.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from hybrax.layers.embeddings import apply_rotary
from hybrax.layers.parameters import logical_param, normal
from hybrax.layers.partitioned import dot_product_attention
from hybrax.layers.projection import project
from hybrax.layers.sequence_parallel.layout import default_positions, seq_size
from hybrax.layers.softmax.ring_attention import ring_attention
from hybrax.layers.sparse.prefill import check_options, sparse_prefill_attention


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Parameter budget: d_model * D * (2 H + 2 Hkv)."""

    d_model: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10_000.0
    init_std: float = 0.02
    implementation: str | tuple[str, ...] | None = None   # the op's implementation (None: auto)
    dtype: str = "float32"
    param_dtype: str = "float32"
    sparse_prefill: str | None = None                       # selector for the no-cache path (None: dense)
    sparse_block_size: int = 16                             # its square block size
    sparse_options: tuple[tuple[str, object], ...] = ()     # its budget knobs, e.g. (("threshold", 0.95),)
    sparse_implementation: str | tuple[str, ...] | None = None              # block_sparse_attention implementation

    def __post_init__(self):
        if self.sparse_prefill is not None:
            check_options(self.sparse_prefill, dict(self.sparse_options))

    def num_params(self) -> int:
        return self.d_model * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)

    def flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token: projections plus q.k and weights.v over all `seq_len` keys (the
        dense kernels compute every score and mask afterwards, so the full square is counted)."""
        return 2 * self.num_params() + 4 * seq_len * self.num_heads * self.head_dim


def declare_projections(module: nnx.Module, c, rngs: nnx.Rngs) -> None:
    """The q, k, v and output projections of every softmax-attention family (attention, moba, nsa,
    bilevel routing, routing attention): w_q [d, H, D], w_k and w_v [d, Hkv, D], w_o [H, D, d], from
    a config with d_model, num_heads, num_kv_heads, head_dim, init_std and param_dtype."""
    init = normal(c.init_std)
    module.w_q = logical_param(rngs, init, (c.d_model, c.num_heads, c.head_dim), c.param_dtype,
                               ("embed", "heads", "head_dim"))
    module.w_k = logical_param(rngs, init, (c.d_model, c.num_kv_heads, c.head_dim), c.param_dtype,
                               ("embed", "kv_heads", "head_dim"))
    module.w_v = logical_param(rngs, init, (c.d_model, c.num_kv_heads, c.head_dim), c.param_dtype,
                               ("embed", "kv_heads", "head_dim"))
    module.w_o = logical_param(rngs, init, (c.num_heads, c.head_dim, c.d_model), c.param_dtype,
                               ("heads", "head_dim", "embed"))


class Attention(nnx.Module):
    def __init__(self, config: AttentionConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        declare_projections(self, c, rngs)

    def init_cache(self, batch: int, max_len: int) -> dict:
        c = self.config
        shape = (batch, max_len, c.num_kv_heads, c.head_dim)
        return {"k": jnp.zeros(shape, c.dtype), "v": jnp.zeros(shape, c.dtype), "end": jnp.zeros((), jnp.int32)}

    def __call__(self, x_BxTxD, *, segment_ids=None, positions=None, cache=None):
        c = self.config
        B, T, _ = x_BxTxD.shape
        if positions is None:   # natural positions of the rows, in zigzag order under seq > 1
            shards, start = (seq_size(), 0) if cache is None else (1, cache["end"])
            positions = default_positions(B, T, shards, start)
        q_BxTxHxK = apply_rotary(project("btd,dhk->bthk", x_BxTxD, self.w_q, c.dtype), positions, c.rope_theta)
        k_BxTxGxK = apply_rotary(project("btd,dhk->bthk", x_BxTxD, self.w_k, c.dtype), positions, c.rope_theta)
        v_BxTxGxK = project("btd,dhk->bthk", x_BxTxD, self.w_v, c.dtype)
        if cache is None and c.sparse_prefill is not None:
            o_BxTxHxK = sparse_prefill_attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, selector=c.sparse_prefill,
                                                 block_size=c.sparse_block_size, options=dict(c.sparse_options),
                                                 segment_ids=segment_ids, implementation=c.sparse_implementation)
            return project("bthk,hkd->btd", o_BxTxHxK, self.w_o, c.dtype)
        if cache is None and seq_size() > 1:   # sequence parallel: x is in zigzag order, split over seq
            o_BxTxHxK = ring_attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids=segment_ids,
                                       implementation=c.implementation)
            return project("bthk,hkd->btd", o_BxTxHxK, self.w_o, c.dtype)
        if cache is None:
            o_BxTxHxK = dot_product_attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, causal=True, segment_ids=segment_ids,
                                              implementation=c.implementation)
            return project("bthk,hkd->btd", o_BxTxHxK, self.w_o, c.dtype)
        if segment_ids is not None:
            raise ValueError("segment_ids are not supported while decoding with a KV cache; decode one sequence per row")
        end = cache["end"]
        k_cache = jax.lax.dynamic_update_slice(cache["k"], k_BxTxGxK.astype(cache["k"].dtype), (0, end, 0, 0))
        v_cache = jax.lax.dynamic_update_slice(cache["v"], v_BxTxGxK.astype(cache["v"].dtype), (0, end, 0, 0))
        key_index_S = jnp.arange(k_cache.shape[1])
        visible_TxS = key_index_S[None, :] <= (end + jnp.arange(T))[:, None]  # causal within the filled cache
        o_BxTxHxK = dot_product_attention(q_BxTxHxK, k_cache, v_cache, causal=False, mask=visible_TxS,
                                          implementation=c.implementation)
        y = project("bthk,hkd->btd", o_BxTxHxK, self.w_o, c.dtype)
        return y, {"k": k_cache, "v": v_cache, "end": end + T}
