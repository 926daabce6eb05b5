"""The skeleton of every softmax-family mixer (attention, moba, nsa, routing attention, bilevel
routing attention): projections, rotary, the choice of path and the KV cache, written once.

    q = x W_q, k = x W_k, v = x W_v     rotary on q and k at `positions` (none given: the natural
                                        position of each row, in zigzag order under seq > 1, or
                                        cache["end"] + t while decoding)
    o = one of three paths, the part each mixer defines:
        decoding (a cache)              k, v written into the cache at rows end .. end + T - 1,
                                        `attend_cached` reads the filled cache; end += T
        no cache, a mesh with seq > 1   `attend_sequence_parallel` on this device's zigzag rows
        no cache otherwise              `attend` over the whole sequence
    y = o W_o

Shapes: x [B, T, d_model]; q [B, T, H, D]; k, v [B, T, Hkv, D] (H a multiple of Hkv); the cache
holds k, v [B, S, Hkv, D] (S = max_len) and end, plus what the mixer's `cache_state` adds.
Parameters: w_q [d, H, D], w_k and w_v [d, Hkv, D], w_o [H, D, d].
"""

import jax
import jax.numpy as jnp
from flax import nnx
from pydantic import model_validator

from hybrax.layers.config import DType, Implementation, LayerConfig, itemsize
from hybrax.layers.embeddings import apply_rotary
from hybrax.layers.parameters import logical_param, normal
from hybrax.layers.projection import project
from hybrax.layers.sequence_parallel.layout import default_positions, seq_size


class SoftmaxConfig(LayerConfig):
    """The settings every softmax-family mixer shares. Parameter budget: d_model * D * (2 H + 2 Hkv)."""

    d_model: int = 256
    num_heads: int = 4                  # query heads (unset: model.num_heads)
    num_kv_heads: int = 4               # key/value heads, grouped-query (unset: model.num_kv_heads)
    head_dim: int = 64                  # (unset: the model's head_dim)
    rope_theta: float = 10_000.0
    init_std: float = 0.02
    implementation: Implementation = None   # the op's implementation (unset: model.kernels.<the op>)
    dtype: DType = "float32"
    param_dtype: DType = "float32"

    @model_validator(mode="after")
    def _check_heads(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads={self.num_kv_heads} does not divide num_heads={self.num_heads}")
        return self

    def projection_params(self) -> int:
        return self.d_model * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)

    def num_params(self) -> int:
        return self.projection_params()

    def kv_cache_bytes_per_token(self) -> float:
        """The keys and values of every kv head (a mixer's own cache entries add to it)."""
        return 2 * self.num_kv_heads * self.head_dim * itemsize(self.dtype)


def declare_projections(module: nnx.Module, c, rngs: nnx.Rngs) -> None:
    """The q, k, v and output projections: w_q [d, H, D], w_k and w_v [d, Hkv, D], w_o [H, D, d],
    from a config with d_model, num_heads, num_kv_heads, head_dim, init_std and param_dtype."""
    init = normal(c.init_std)
    module.w_q = logical_param(rngs, init, (c.d_model, c.num_heads, c.head_dim), c.param_dtype,
                               ("embed", "heads", "head_dim"))
    module.w_k = logical_param(rngs, init, (c.d_model, c.num_kv_heads, c.head_dim), c.param_dtype,
                               ("embed", "kv_heads", "head_dim"))
    module.w_v = logical_param(rngs, init, (c.d_model, c.num_kv_heads, c.head_dim), c.param_dtype,
                               ("embed", "kv_heads", "head_dim"))
    module.w_o = logical_param(rngs, init, (c.num_heads, c.head_dim, c.d_model), c.param_dtype,
                               ("heads", "head_dim", "embed"))


def append_to_cache(cache_BxSx___, new_BxTx___, end) -> jax.Array:
    """The cache with the T new rows written at rows end .. end + T - 1 (axis 1), in its dtype."""
    return jax.lax.dynamic_update_slice_in_dim(cache_BxSx___, new_BxTx___.astype(cache_BxSx___.dtype), end, axis=1)


def call_positions(batch: int, length: int, segment_ids, positions, cache) -> jax.Array:
    """The positions of a call's rows: `positions`, else the natural ones (in zigzag order under
    seq > 1, cache["end"] + t while decoding). Refuses segment_ids with a cache."""
    if cache is not None and segment_ids is not None:
        raise ValueError("segment_ids are not supported while decoding with a KV cache; decode one sequence per row")
    if positions is not None:
        return positions
    shards, start = (seq_size(), 0) if cache is None else (1, cache["end"])
    return default_positions(batch, length, shards, start)


class SoftmaxMixer(nnx.Module):
    """A subclass defines how it attends on each path (`attend`, `attend_sequence_parallel`,
    `attend_cached`) and, if it needs them, `token_inputs` (more per-token inputs, passed to the
    three as keywords) and `cache_state` (more cache entries); its config has d_model, num_heads,
    num_kv_heads, head_dim, rope_theta, init_std, dtype and param_dtype."""

    def __init__(self, config, *, rngs: nnx.Rngs):
        self.config = config
        declare_projections(self, config, rngs)

    # ---- what each mixer defines ---------------------------------------------------------------

    def attend(self, q_BxTxHxD, k_BxTxGxD, v_BxTxGxD, segment_ids, **inputs) -> jax.Array:
        """No cache, the whole sequence on this device: o [B, T, H, D]."""
        raise NotImplementedError

    def attend_sequence_parallel(self, q_BxTxHxD, k_BxTxGxD, v_BxTxGxD, segment_ids, **inputs) -> jax.Array:
        """No cache, under a mesh with seq > 1: the rows (and segment_ids) are in zigzag order, split
        over seq. o [B, T, H, D] in the same order."""
        raise NotImplementedError

    def attend_cached(self, q_BxTxHxD, k_BxSxGxD, v_BxSxGxD, position_T, cache, **inputs):
        """Decoding: the T new queries, at natural positions position_T = end + arange(T), against the
        cache's keys and values, which already hold the new ones (rows past the last are zeros).
        `cache` is the one passed in. Returns (o [B, T, H, D], the updated cache entries other than
        k, v and end)."""
        raise NotImplementedError

    def token_inputs(self, x_BxTxD, q_BxTxHxD, k_BxTxGxD) -> dict:
        """Per-token inputs besides q, k, v (given q and k before rotary), by keyword."""
        return {}

    def cache_state(self, batch: int, max_len: int) -> dict:
        """The cache entries besides k, v and end."""
        return {}

    # ---- the skeleton --------------------------------------------------------------------------

    def init_cache(self, batch: int, max_len: int) -> dict:
        c = self.config
        shape = (batch, max_len, c.num_kv_heads, c.head_dim)
        return {"k": jnp.zeros(shape, c.dtype), "v": jnp.zeros(shape, c.dtype), "end": jnp.zeros((), jnp.int32),
                **self.cache_state(batch, max_len)}

    def __call__(self, x_BxTxD, *, segment_ids=None, positions=None, cache=None):
        c = self.config
        B, T, _ = x_BxTxD.shape
        positions = call_positions(B, T, segment_ids, positions, cache)
        q_BxTxHxD = project("btd,dhk->bthk", x_BxTxD, self.w_q, c.dtype)
        k_BxTxGxD = project("btd,dhk->bthk", x_BxTxD, self.w_k, c.dtype)
        v_BxTxGxD = project("btd,dhk->bthk", x_BxTxD, self.w_v, c.dtype)
        inputs = self.token_inputs(x_BxTxD, q_BxTxHxD, k_BxTxGxD)
        q_BxTxHxD = apply_rotary(q_BxTxHxD, positions, c.rope_theta)
        k_BxTxGxD = apply_rotary(k_BxTxGxD, positions, c.rope_theta)
        if cache is None:
            attend = self.attend_sequence_parallel if seq_size() > 1 else self.attend
            o_BxTxHxD = attend(q_BxTxHxD, k_BxTxGxD, v_BxTxGxD, segment_ids, **inputs)
            return project("bthk,hkd->btd", o_BxTxHxD, self.w_o, c.dtype)
        end = cache["end"]
        k_BxSxGxD = append_to_cache(cache["k"], k_BxTxGxD, end)
        v_BxSxGxD = append_to_cache(cache["v"], v_BxTxGxD, end)
        o_BxTxHxD, state = self.attend_cached(q_BxTxHxD, k_BxSxGxD, v_BxSxGxD, end + jnp.arange(T), cache, **inputs)
        y_BxTxD = project("bthk,hkd->btd", o_BxTxHxD, self.w_o, c.dtype)
        return y_BxTxD, {"k": k_BxSxGxD, "v": v_BxSxGxD, "end": end + T, **state}
