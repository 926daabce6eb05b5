"""Multi-head Latent Attention (DeepSeek-AI, 2024, "DeepSeek-V2: A Strong, Economical, and Efficient
Mixture-of-Experts Language Model", section 2.1): every head's keys and values are decoded from one
low-rank latent per token, and R decoupled rotary key heads are shared by all query heads, so the
decoding cache holds d_c + R Dr numbers per token instead of the 2 Hkv D of grouped-query attention.

    c      = x W_dkv                                 [B, T, d_c]       the KV latent
    k_nope = c W_uk,  v = c W_uv                     [B, T, H, Dn], [B, T, H, Dv]
    k_rope = rotary(x W_kr)                          [B, T, R, Dr]     shared by every query head
    q_nope = x W_q_nope  (q_latent: x W_dq W_uq_nope)                 [B, T, H, Dn]
    q_rope = rotary(x W_q_rope)  (q_latent: x W_dq W_uq_rope)         [B, T, H, R, Dr]
    s_h(t, u) = (q_nope_h(t) . k_nope_h(u) + sum_r q_rope_{h,r}(t) . k_rope_r(u)) / sqrt(Dn + R Dr)
    o_h = softmax_u(s_h + causal/segment mask) v_h,    y = sum_h o_h W_o[h]

Rotary acts at `positions` (none given: the natural ones, zigzag-aware under seq > 1, end + t while
decoding) over the Dr channels of each rope head, query and key alike. The same attention has two
forms:
- expanded (no cache, one device on seq): H-head attention (`dot_product_attention`) with
  q = [q_nope | q_rope] and k = [k_nope | k_rope, copied to each head], of width Dk = Dn + R Dr,
  and v of width Dv. The op takes one width for q, k and v, so the narrower side is zero-padded to
  W = max(Dk, Dv) (zeros add nothing to a score, and padded value columns are sliced off).
- absorbed (decoding, and sequence parallel): W_uk moves onto the query and W_uv after the
  attention weights, which leaves multi-query attention over the latent, keys == values:
      q_abs_h = [q_nope_h W_uk_h^T | q_rope_h]       [B, T, H, d_c + R Dr]
      kv      = [c | k_rope]                         [B, S, 1, d_c + R Dr]
      o_h     = (softmax(q_abs_h kv^T / sqrt(Dn + R Dr)) kv)[..., :d_c] W_uv_h
  exact in real arithmetic, since q_nope_h W_uk_h^T c^T = q_nope_h k_nope_h^T.
Decoding: the cache holds latent [B, S, d_c], k_rope [B, S, R Dr] (rotated) and end, d_c + R Dr numbers
per token in `dtype`; the T new rows are written at end .. end + T - 1 and the T queries attend
(absorbed) to every key at a position <= their own.
Sequence parallel (a mesh with seq > 1, rows in zigzag order): the absorbed form under
`ring_attention`, so what travels around the ring is the latent [c | k_rope], d_c + R Dr numbers per
token, instead of per-head keys and values (H (Dk + Dv)).

DeepSeek-V2 also puts an RMSNorm on each latent (c and x W_dq); this layer has none, so that a
grouped-query checkpoint factors into it exactly (W_k = W_dkv W_uk).

Parameter budget (d = d_model): d H Dn + d H R Dr (queries; with q_latent d d_q + d_q H (Dn + R Dr))
+ d d_c + d_c H (Dn + Dv) + d R Dr + H Dv d.
"""

from typing import ClassVar

import jax.numpy as jnp
from flax import nnx
from pydantic import model_validator

from hybrax.layers.config import DType, Implementation, LayerConfig, ModelShape, itemsize
from hybrax.layers.embeddings import apply_rotary
from hybrax.layers.parameters import logical_param, normal
from hybrax.layers.partitioned import dot_product_attention
from hybrax.layers.projection import project
from hybrax.layers.sequence_parallel.layout import default_positions, seq_size
from hybrax.layers.softmax.ring_attention import ring_attention
from hybrax.layers.softmax.skeleton import append_to_cache, call_positions


class MLAConfig(LayerConfig):
    """Parameter budget: see the module docstring."""

    kernel: ClassVar[str] = "attention"
    tiny: ClassVar[dict] = {"kv_latent": 12, "rope_head_dim": 4, "rope_heads": 1}

    d_model: int = 256
    num_heads: int = 4                  # query heads H (unset: model.num_heads)
    head_dim: int = 64                  # the width the others follow (unset: the model's head_dim)
    nope_head_dim: int | None = None    # Dn, per-head query/key width without rotary (None: head_dim)
    value_head_dim: int | None = None   # Dv, per-head value width (None: head_dim)
    kv_latent: int | None = None        # d_c, the cached KV latent per token (None: 4 head_dim, DeepSeek-V2's)
    q_latent: int | None = None         # d_q, low-rank queries through [B, T, d_q] (None: full-rank queries)
    rope_head_dim: int | None = None    # Dr, even: rotary width of each rope head (None: head_dim / 2, made even)
    rope_heads: int = 1                 # R, rotary key heads shared by every query head (DeepSeek-V2: 1)
    rope_theta: float = 10_000.0
    init_std: float = 0.02
    implementation: Implementation = None   # dot_product_attention implementation (unset: model.kernels)
    dtype: DType = "float32"
    param_dtype: DType = "float32"

    def derived(self, shape: ModelShape) -> dict:
        head_dim = self.head_dim if "head_dim" in self.model_fields_set else shape.head_dim
        return {"nope_head_dim": head_dim, "value_head_dim": head_dim, "kv_latent": 4 * head_dim,
                "rope_head_dim": max(2, head_dim // 2 // 2 * 2)}

    @model_validator(mode="after")
    def _check(self):
        if self.rope_head_dim is not None and (self.rope_head_dim < 2 or self.rope_head_dim % 2):
            raise ValueError(f"rope_head_dim={self.rope_head_dim} must be even and >= 2: rotary turns pairs of "
                             "channels")
        widths = {"num_heads": self.num_heads, "rope_heads": self.rope_heads, "nope_head_dim": self.nope_head_dim,
                  "value_head_dim": self.value_head_dim, "kv_latent": self.kv_latent, "q_latent": self.q_latent}
        for name, value in widths.items():
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        return self

    @property
    def key_width(self) -> int:
        """Dk = Dn + R Dr: the per-head query/key width of the expanded form (its scale is Dk^-1/2)."""
        return self.nope_head_dim + self.rope_heads * self.rope_head_dim

    @property
    def latent_width(self) -> int:
        """d_c + R Dr: the numbers cached per token, and the key/value width of the absorbed form."""
        return self.kv_latent + self.rope_heads * self.rope_head_dim

    def num_params(self) -> int:
        d, H, Dn, Dv, C = self.d_model, self.num_heads, self.nope_head_dim, self.value_head_dim, self.kv_latent
        RDr = self.rope_heads * self.rope_head_dim
        queries = d * H * (Dn + RDr) if self.q_latent is None else d * self.q_latent + self.q_latent * H * (Dn + RDr)
        return queries + d * C + C * H * (Dn + Dv) + d * RDr + H * Dv * d

    def flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token of the expanded (training) form: every parameter once in a matmul,
        plus q.k and weights.v over all `seq_len` keys at the padded width max(Dk, Dv) (the dense
        kernels compute every score and mask afterwards, so the full square is counted)."""
        padded = max(self.key_width, self.value_head_dim)
        return 2 * self.num_params() + 4 * seq_len * self.num_heads * padded

    def kv_cache_bytes_per_token(self) -> float:
        """The latent and the rotated rope keys: d_c + R Dr numbers of `dtype` per token."""
        return self.latent_width * itemsize(self.dtype)


class MLA(nnx.Module):
    def __init__(self, config: MLAConfig, *, rngs: nnx.Rngs):
        c = self.config = config
        init = normal(c.init_std)
        d, H, Dn, Dv, C, R, Dr = (c.d_model, c.num_heads, c.nope_head_dim, c.value_head_dim, c.kv_latent,
                                  c.rope_heads, c.rope_head_dim)
        # the rope-head axis R stays whole: every query head reads every rope key head
        if c.q_latent is None:
            self.w_q_nope = logical_param(rngs, init, (d, H, Dn), c.param_dtype, ("embed", "heads", "head_dim"))
            self.w_q_rope = logical_param(rngs, init, (d, H, R, Dr), c.param_dtype,
                                          ("embed", "heads", None, "head_dim"))
        else:
            self.w_dq = logical_param(rngs, init, (d, c.q_latent), c.param_dtype, ("embed", "low_rank"))
            self.w_uq_nope = logical_param(rngs, init, (c.q_latent, H, Dn), c.param_dtype,
                                           ("low_rank", "heads", "head_dim"))
            self.w_uq_rope = logical_param(rngs, init, (c.q_latent, H, R, Dr), c.param_dtype,
                                           ("low_rank", "heads", None, "head_dim"))
        self.w_dkv = logical_param(rngs, init, (d, C), c.param_dtype, ("embed", "low_rank"))
        self.w_uk = logical_param(rngs, init, (C, H, Dn), c.param_dtype, ("low_rank", "heads", "head_dim"))
        self.w_uv = logical_param(rngs, init, (C, H, Dv), c.param_dtype, ("low_rank", "heads", "head_dim"))
        self.w_kr = logical_param(rngs, init, (d, R, Dr), c.param_dtype, ("embed", None, "head_dim"))
        self.w_o = logical_param(rngs, init, (H, Dv, d), c.param_dtype, ("heads", "head_dim", "embed"))

    def init_cache(self, batch: int, max_len: int) -> dict:
        """latent [B, S, d_c] and rotated k_rope [B, S, R Dr] in `dtype`, and the fill counter end."""
        c = self.config
        return {"latent": jnp.zeros((batch, max_len, c.kv_latent), c.dtype),
                "k_rope": jnp.zeros((batch, max_len, c.rope_heads * c.rope_head_dim), c.dtype),
                "end": jnp.zeros((), jnp.int32)}

    # ---- projections ---------------------------------------------------------------------------

    def queries(self, x_BxTxD, positions_BxT):
        """(q_nope [B, T, H, Dn], q_rope [B, T, H, R Dr] rotated)."""
        c = self.config
        B, T, _ = x_BxTxD.shape
        if c.q_latent is None:
            q_nope_BxTxHxN = project("btd,dhn->bthn", x_BxTxD, self.w_q_nope, c.dtype)
            q_rope_BxTxHxRxP = project("btd,dhrp->bthrp", x_BxTxD, self.w_q_rope, c.dtype)
        else:
            q_latent_BxTxQ = project("btd,dq->btq", x_BxTxD, self.w_dq, c.dtype)
            q_nope_BxTxHxN = project("btq,qhn->bthn", q_latent_BxTxQ, self.w_uq_nope, c.dtype)
            q_rope_BxTxHxRxP = project("btq,qhrp->bthrp", q_latent_BxTxQ, self.w_uq_rope, c.dtype)
        # rotary over the Dr channels of each (query head, rope head) pair
        q_rope_BxTx_HR_xP = apply_rotary(q_rope_BxTxHxRxP.reshape(B, T, -1, c.rope_head_dim), positions_BxT,
                                         c.rope_theta)
        return q_nope_BxTxHxN, q_rope_BxTx_HR_xP.reshape(B, T, c.num_heads, -1)

    def latents(self, x_BxTxD, positions_BxT):
        """(latent c [B, T, d_c], k_rope [B, T, R Dr] rotated): all that the keys and values need."""
        c = self.config
        B, T, _ = x_BxTxD.shape
        latent_BxTxC = project("btd,dc->btc", x_BxTxD, self.w_dkv, c.dtype)
        k_rope_BxTxRxP = apply_rotary(project("btd,drp->btrp", x_BxTxD, self.w_kr, c.dtype), positions_BxT,
                                      c.rope_theta)
        return latent_BxTxC, k_rope_BxTxRxP.reshape(B, T, -1)

    # ---- the two forms of the attention -----------------------------------------------------------

    def attend_expanded(self, q_nope_BxTxHxN, q_rope_BxTxHxP, latent_BxTxC, k_rope_BxTxP, segment_ids):
        """Causal H-head attention with per-head keys and values decoded from the latent: o [B, T, H, Dv]."""
        c = self.config
        H, Dk, Dv = c.num_heads, c.key_width, c.value_head_dim
        k_nope_BxTxHxN = project("btc,chn->bthn", latent_BxTxC, self.w_uk, c.dtype)
        v_BxTxHxV = project("btc,chv->bthv", latent_BxTxC, self.w_uv, c.dtype)
        B, T, P = k_rope_BxTxP.shape
        k_rope_BxTxHxP = jnp.broadcast_to(k_rope_BxTxP[:, :, None], (B, T, H, P))
        q_BxTxHxK = jnp.concatenate([q_nope_BxTxHxN, q_rope_BxTxHxP], axis=-1)
        k_BxTxHxK = jnp.concatenate([k_nope_BxTxHxN, k_rope_BxTxHxP.astype(k_nope_BxTxHxN.dtype)], axis=-1)
        W = max(Dk, Dv)   # the op takes one width: zero channels add nothing to a score or an output
        pad = lambda a: jnp.pad(a, ((0, 0),) * 3 + ((0, W - a.shape[-1]),))  # noqa: E731
        o_BxTxHxW = dot_product_attention(pad(q_BxTxHxK), pad(k_BxTxHxK), pad(v_BxTxHxV), causal=True,
                                          scale=Dk ** -0.5, segment_ids=segment_ids,
                                          implementation=c.implementation)
        return o_BxTxHxW[..., :Dv]

    def attend_absorbed(self, q_nope_BxTxHxN, q_rope_BxTxHxP, latent_BxSxC, k_rope_BxSxP, *, segment_ids=None,
                        visible_TxS=None):
        """Multi-query attention over the latent kv = [c | k_rope] (one head, keys == values):
        o [B, T, H, Dv]. With `visible_TxS` (decoding: T queries against S cached rows) that mask
        alone; else causal over S == T rows with `segment_ids`, by `ring_attention` under seq > 1
        (rows in zigzag order) and `dot_product_attention` otherwise."""
        c = self.config
        q_absorbed_BxTxHxC = project("bthn,chn->bthc", q_nope_BxTxHxN, self.w_uk, c.dtype)
        q_BxTxHxL = jnp.concatenate([q_absorbed_BxTxHxC, q_rope_BxTxHxP.astype(q_absorbed_BxTxHxC.dtype)], axis=-1)
        kv_BxSx1xL = jnp.concatenate([latent_BxSxC, k_rope_BxSxP.astype(latent_BxSxC.dtype)], axis=-1)[:, :, None]
        scale = c.key_width ** -0.5   # the expanded form's: scores are the same numbers
        if visible_TxS is not None:
            o_BxTxHxL = dot_product_attention(q_BxTxHxL, kv_BxSx1xL, kv_BxSx1xL, causal=False, scale=scale,
                                              mask=visible_TxS, implementation=c.implementation)
        elif seq_size() > 1:
            o_BxTxHxL = ring_attention(q_BxTxHxL, kv_BxSx1xL, kv_BxSx1xL, segment_ids=segment_ids, scale=scale,
                                       implementation=c.implementation)
        else:
            o_BxTxHxL = dot_product_attention(q_BxTxHxL, kv_BxSx1xL, kv_BxSx1xL, causal=True, scale=scale,
                                              segment_ids=segment_ids, implementation=c.implementation)
        return project("bthc,chv->bthv", o_BxTxHxL[..., :c.kv_latent], self.w_uv, c.dtype)

    # ---- the layer -------------------------------------------------------------------------------

    def forward(self, x_BxTxD, *, segment_ids=None, positions=None, absorbed: bool = False):
        """No cache: y [B, T, d_model] by the expanded form, or by the absorbed one (what the layer
        runs under seq > 1; on one device it is the same function, for tests and comparisons)."""
        c = self.config
        B, T, _ = x_BxTxD.shape
        if positions is None:   # natural positions of the rows, in zigzag order under seq > 1
            positions = default_positions(B, T, seq_size())
        q_nope_BxTxHxN, q_rope_BxTxHxP = self.queries(x_BxTxD, positions)
        latent_BxTxC, k_rope_BxTxP = self.latents(x_BxTxD, positions)
        if absorbed:
            o_BxTxHxV = self.attend_absorbed(q_nope_BxTxHxN, q_rope_BxTxHxP, latent_BxTxC, k_rope_BxTxP,
                                             segment_ids=segment_ids)
        else:
            o_BxTxHxV = self.attend_expanded(q_nope_BxTxHxN, q_rope_BxTxHxP, latent_BxTxC, k_rope_BxTxP, segment_ids)
        return project("bthv,hvd->btd", o_BxTxHxV, self.w_o, c.dtype)

    def __call__(self, x_BxTxD, *, segment_ids=None, positions=None, cache=None):
        c = self.config
        if cache is None:
            return self.forward(x_BxTxD, segment_ids=segment_ids, positions=positions, absorbed=seq_size() > 1)
        B, T, _ = x_BxTxD.shape
        end = cache["end"]
        positions = call_positions(B, T, segment_ids, positions, cache)
        q_nope_BxTxHxN, q_rope_BxTxHxP = self.queries(x_BxTxD, positions)
        latent_BxTxC, k_rope_BxTxP = self.latents(x_BxTxD, positions)
        latent_BxSxC = append_to_cache(cache["latent"], latent_BxTxC, end)
        k_rope_BxSxP = append_to_cache(cache["k_rope"], k_rope_BxTxP, end)
        position_T = end + jnp.arange(T)
        visible_TxS = jnp.arange(latent_BxSxC.shape[1])[None, :] <= position_T[:, None]  # causal in the filled cache
        o_BxTxHxV = self.attend_absorbed(q_nope_BxTxHxN, q_rope_BxTxHxP, latent_BxSxC, k_rope_BxSxP,
                                         visible_TxS=visible_TxS)
        y_BxTxD = project("bthv,hvd->btd", o_BxTxHxV, self.w_o, c.dtype)
        return y_BxTxD, {"latent": latent_BxSxC, "k_rope": k_rope_BxSxP, "end": end + T}
