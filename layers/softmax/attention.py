"""Causal softmax attention with grouped-query heads (Ainslie et al., 2023) and rotary positions.

    q = x W_q, k = x W_k, v = x W_v  (rotary applied to q and k at `positions`)
    o = softmax(q k^T / sqrt(D) + causal/segment mask) v,  y = o W_o

Shapes: x [B, T, d_model]; q [B, T, H, D]; k, v [B, T, Hkv, D] with H a multiple of Hkv.
Decoding keeps a KV cache of fixed length (`init_cache`); each call appends its keys and values.
With `prefill_selector` set (a name in `layers.sparse.prefill.SELECTORS`), the no-cache path lets that
training-free selector list key blocks and runs `block_sparse_attention` over them; decoding with a
cache stays dense.
Under a mesh with seq > 1 the dense no-cache path is ring attention (`layers.sequence_parallel`):
x, segment_ids and positions come in zigzag order, split over seq.
"""

from typing import ClassVar, Literal

import jax.numpy as jnp
from pydantic import field_validator, model_validator

from hybrax.layers.config import Implementation, ModelShape
from hybrax.layers.partitioned import dot_product_attention
from hybrax.layers.softmax.ring_attention import ring_attention
from hybrax.layers.softmax.skeleton import SoftmaxConfig, SoftmaxMixer
from hybrax.layers.sparse.prefill import check_options, sparse_prefill_attention


class AttentionConfig(SoftmaxConfig):
    """Parameter budget: d_model * D * (2 H + 2 Hkv)."""

    kernel: ClassVar[str] = "attention"

    # training-free sparse prefill (layers/sparse/prefill): on the no-cache path the selector lists
    # key blocks of prefill_block_size and block_sparse_attention reads only those; decoding stays dense
    prefill_selector: Literal["xattention", "minference", "flexprefill"] | None = None
    prefill_block_size: int = 16        # square block of the sparse prefill
    prefill_options: tuple[tuple[str, float | int | None], ...] = ()   # selector budget, e.g. {threshold: 0.95}
    prefill_implementation: Implementation = None   # its block_sparse_attention (unset: model.kernels)

    @field_validator("prefill_options", mode="before")
    @classmethod
    def _options_from_mapping(cls, value):
        return tuple(sorted(value.items())) if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _check_prefill(self):
        if self.prefill_selector is not None:
            check_options(self.prefill_selector, dict(self.prefill_options))
        return self

    def derived(self, shape: ModelShape) -> dict:
        return {"prefill_implementation": shape.implementation("block_sparse_attention")}

    def flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token: projections plus q.k and weights.v over all `seq_len` keys (the
        dense kernels compute every score and mask afterwards, so the full square is counted)."""
        return 2 * self.num_params() + 4 * seq_len * self.num_heads * self.head_dim


class Attention(SoftmaxMixer):
    def attend(self, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids):
        sparse_BxTxHxK = self._sparse_prefill(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids)
        if sparse_BxTxHxK is not None:
            return sparse_BxTxHxK
        return dot_product_attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, causal=True, segment_ids=segment_ids,
                                     implementation=self.config.implementation)

    def attend_sequence_parallel(self, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids):
        sparse_BxTxHxK = self._sparse_prefill(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids)
        if sparse_BxTxHxK is not None:
            return sparse_BxTxHxK
        return ring_attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids=segment_ids,
                              implementation=self.config.implementation)

    def attend_cached(self, q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, position_T, cache):
        visible_TxS = jnp.arange(k_BxSxGxK.shape[1])[None, :] <= position_T[:, None]  # causal within the filled cache
        o_BxTxHxK = dot_product_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, causal=False, mask=visible_TxS,
                                          implementation=self.config.implementation)
        return o_BxTxHxK, {}

    def _sparse_prefill(self, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids):
        """The selector's block-sparse attention when one is set (sequence parallel by itself), else None."""
        c = self.config
        if c.prefill_selector is None:
            return None
        return sparse_prefill_attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, selector=c.prefill_selector,
                                        block_size=c.prefill_block_size, options=dict(c.prefill_options),
                                        segment_ids=segment_ids, implementation=c.prefill_implementation)
