"""Routing attention (Roy et al., 2021, "Efficient Content-Based Sparse Attention with Routing
Transformers"), causal and at block granularity, on `block_sparse_attention`.

Routing heads cluster queries and keys with online k-means: unit-normalised content vectors
q^ = q / |q|, k^ = k / |k| (before rotary, so the clusters are about content, not position) and
per-head centroids mu [Hr, C, D] kept as non-gradient `RouterState`. A query attends to the keys of
its own cluster. At block granularity (blocks of b tokens), causally:

    c_n    = argmax_c mu_c . q^_{n b}                  cluster of query block n, from its first query
    kbar_m = normalise(mean_{j in block m} k^_j)       summary of key block m
    a_m    = argmax_c mu_c . kbar_m                    cluster of key block m
    block n attends to: the top_k complete past blocks m < n with a_m = c_n (ranked by
    mu_{c_n} . kbar_m), plus its own block n (causally masked inside the op).

Every token of block n uses a choice made from positions <= n b (its block's first position) and
complete past blocks, so the choice leaks nothing from the future, and decoding token by token
gives the parallel form's outputs. Each query block reads at most (top_k + 1) b keys: balanced
compute whatever the cluster sizes. As in the paper, the first `local_heads` heads are local
instead (blocks n - 1 and n: a sliding window of b..2b tokens).

Centroids learn by mini-batch k-means with an exponential moving average, in training mode only
(`model.train()`): every routing query and key is assigned to its nearest centroid and
mu_c <- normalise(decay mu_c + (1 - decay) mean(assigned)) for clusters that received vectors. An
optional commitment loss, weight * mean ||x^ - mu_assigned||^2 over routing queries and keys
(as lucidrains/routing-transformer; 1e-4 there), pulls the projections toward their centroids; it
is reported as an auxiliary loss, and the cluster load (max count / mean count) as a metric.

Shapes: x [B, T, d_model]; q [B, T, H, D]; k, v [B, T, Hkv, D]. Parameter budget: d_model D (2 H +
2 Hkv), as softmax attention; the centroids (Hr C D numbers) are state, not parameters.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from layers.attention import declare_projections
from layers.auxiliary import RouterState, report_loss, report_metric
from layers.block_selection import (attend_with_mask, block_mean, causal_top_k_blocks, local_blocks,
                                    same_segment_candidates, selection_mask)
from layers.embeddings import apply_rotary
from layers.projection import project
from pallas_kernels.block_sparse_attention import block_sparse_attention


@dataclasses.dataclass(frozen=True)
class RoutingAttentionConfig:
    """Parameter budget: d_model * D * (2 H + 2 Hkv); plus Hr * C * D centroid state."""

    d_model: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int = 16
    top_k: int = 2
    num_clusters: int = 4
    local_heads: int | None = None       # None: half of the heads (rounded down)
    kmeans_decay: float = 0.999
    commitment_weight: float = 1e-4
    rope_theta: float = 10_000.0
    init_std: float = 0.02
    implementation: str | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        if not 0 <= self.num_local_heads < self.num_heads:
            raise ValueError(f"local_heads={self.local_heads} must be in [0, num_heads={self.num_heads}) so that "
                             "at least one head routes")
        if self.num_clusters < 1 or self.top_k < 0 or self.block_size < 1:
            raise ValueError(f"num_clusters={self.num_clusters} must be >= 1, top_k={self.top_k} >= 0, "
                             f"block_size={self.block_size} >= 1")
        if not 0.0 <= self.kmeans_decay < 1.0:
            raise ValueError(f"kmeans_decay={self.kmeans_decay} must be in [0, 1)")

    @property
    def num_local_heads(self) -> int:
        return self.num_heads // 2 if self.local_heads is None else self.local_heads

    @property
    def num_routing_heads(self) -> int:
        return self.num_heads - self.num_local_heads

    def num_params(self) -> int:
        return self.d_model * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)

    def flops_per_token(self, seq_len: int) -> int:
        """Projections, q.k and weights.v over at most (top_k + 1) blocks for routing heads and 2
        blocks for local heads (never more than seq_len keys), and the centroid scores of the
        routing queries and keys (2 C D each)."""
        b = self.block_size
        routed_keys = min(seq_len, (self.top_k + 1) * b)
        local_keys = min(seq_len, 2 * b)
        attend = 4 * self.head_dim * (self.num_routing_heads * routed_keys + self.num_local_heads * local_keys)
        centroids = 2 * 2 * self.num_routing_heads * self.num_clusters * self.head_dim
        return 2 * self.num_params() + attend + centroids


def _unit(x, axis=-1):
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=axis, keepdims=True) + 1e-12)


def routed_block_indices(q_cluster_BxHxQ, query_block_Q, key_scores_BxHxMxC, valid_BxQxM, top_k: int):
    """In-cluster top_k complete past blocks plus the current block: int32 [B, H, Q, top_k + 1].

    Row q is query block `query_block_Q[q]` with cluster q_cluster; key_scores[b, h, m, c] =
    mu_{h, c} . kbar_m. Key block m may be taken when m < the query block, its cluster (argmax over
    c) equals the query block's, and `valid` holds (same segment); ranked by mu_{c_n} . kbar_m."""
    key_cluster_BxHxM = jnp.argmax(key_scores_BxHxMxC, axis=-1)
    score_BxHxMxQ = jnp.take_along_axis(key_scores_BxHxMxC, q_cluster_BxHxQ[:, :, None, :], axis=3)
    same_cluster_BxHxQxM = key_cluster_BxHxM[:, :, None, :] == q_cluster_BxHxQ[..., None]
    return causal_top_k_blocks(score_BxHxMxQ.transpose(0, 1, 3, 2), query_block_Q, top_k,
                               same_cluster_BxHxQxM & valid_BxQxM[:, None])


class RoutingAttention(nnx.Module):
    def __init__(self, config: RoutingAttentionConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        declare_projections(self, c, rngs)
        centroids = jax.random.normal(rngs.params(), (c.num_routing_heads, c.num_clusters, c.head_dim))
        self.centroids = RouterState(_unit(centroids))
        self.deterministic = True   # training mode (model.train()) updates the centroids

    # -- shared pieces ---------------------------------------------------------------------------
    def _project(self, x_BxTxD, positions):
        c = self.config
        q_BxTxHxK = project("btd,dhk->bthk", x_BxTxD, self.w_q, c.dtype)
        k_BxTxGxK = project("btd,dhk->bthk", x_BxTxD, self.w_k, c.dtype)
        v_BxTxGxK = project("btd,dhk->bthk", x_BxTxD, self.w_v, c.dtype)
        q_hat = _unit(q_BxTxHxK[:, :, c.num_local_heads:])              # routing heads' content vectors
        k_hat = _unit(k_BxTxGxK)
        q_rot = apply_rotary(q_BxTxHxK, positions, c.rope_theta)
        k_rot = apply_rotary(k_BxTxGxK, positions, c.rope_theta)
        return q_rot, k_rot, v_BxTxGxK, q_hat, k_hat

    def _routing_keys(self, k_hat_BxTxGxD):
        """Each routing head's view of the unit keys, [B, T, Hr, D] (grouped-query heads)."""
        c = self.config
        group = c.num_heads // c.num_kv_heads
        kv_head = (jnp.arange(c.num_local_heads, c.num_heads) // group)
        return k_hat_BxTxGxD[:, :, kv_head]

    def _centroid_scores(self, x_hat_BxTxRxD):
        return jnp.einsum("btrd,rcd->brtc", x_hat_BxTxRxD, jax.lax.stop_gradient(self.centroids[...]))

    def _key_block_scores(self, k_hat_BxTxRxD):
        """mu_{h, c} . kbar_m, [B, Hr, M, C], with kbar_m the unit mean of block m's unit keys."""
        kbar_BxMxRxD = _unit(block_mean(k_hat_BxTxRxD, self.config.block_size))
        return jnp.einsum("bmrd,rcd->brmc", kbar_BxMxRxD, jax.lax.stop_gradient(self.centroids[...]))

    # -- training-time k-means -------------------------------------------------------------------
    def _update_centroids(self, q_hat_BxTxRxD, k_hat_BxTxRxD):
        c = self.config
        x_hat = jnp.concatenate([q_hat_BxTxRxD, k_hat_BxTxRxD], axis=1)                # [B, 2T, Hr, D]
        mu = self.centroids[...]
        assign = jnp.argmax(jnp.einsum("btrd,rcd->brtc", jax.lax.stop_gradient(x_hat), mu), axis=-1)
        onehot_BxRxTxC = jax.nn.one_hot(assign, c.num_clusters, dtype=jnp.float32)
        nearest_BxRxTxD = jnp.einsum("brtc,rcd->brtd", onehot_BxRxTxC, mu)
        if c.commitment_weight:
            gap = x_hat.transpose(0, 2, 1, 3) - nearest_BxRxTxD
            report_loss(self, "commitment", c.commitment_weight * jnp.mean(jnp.sum(gap * gap, axis=-1)))
        counts_RxC = onehot_BxRxTxC.sum(axis=(0, 2))
        sums_RxCxD = jnp.einsum("brtc,btrd->rcd", onehot_BxRxTxC, jax.lax.stop_gradient(x_hat))
        means = sums_RxCxD / jnp.maximum(counts_RxC, 1.0)[..., None]
        moved = _unit(c.kmeans_decay * mu + (1.0 - c.kmeans_decay) * means)
        self.centroids[...] = jnp.where(counts_RxC[..., None] > 0, moved, mu)
        report_metric(self, "cluster_load_max_over_mean", jnp.max(counts_RxC) / jnp.mean(counts_RxC))

    # -- forward ---------------------------------------------------------------------------------
    def __call__(self, x_BxTxD, *, segment_ids=None, positions=None, cache=None):
        if cache is not None:
            if segment_ids is not None:
                raise ValueError("segment_ids are not supported while decoding with a cache; decode one sequence per row")
            return self._decode(x_BxTxD, cache)
        c = self.config
        B, T, _ = x_BxTxD.shape
        b = c.block_size
        N = -(-T // b)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T), (B, T))
        q, k, v, q_hat, k_hat = self._project(x_BxTxD, positions)
        k_hat_routed = self._routing_keys(k_hat)
        first_N = jnp.arange(N) * b
        q_cluster_BxRxN = jnp.argmax(self._centroid_scores(q_hat[:, first_N]), axis=-1)
        key_scores = self._key_block_scores(k_hat_routed)
        seg = jnp.zeros((B, T), jnp.int32) if segment_ids is None else segment_ids
        routed = routed_block_indices(q_cluster_BxRxN, jnp.arange(N), key_scores,
                                      same_segment_candidates(seg, first_N, b), c.top_k)
        local = jnp.full((N, c.top_k + 1), -1, jnp.int32).at[:, :2].set(local_blocks(jnp.arange(N), 1))
        local = jnp.broadcast_to(local, (B, c.num_local_heads, N, c.top_k + 1))
        block_indices = jax.lax.stop_gradient(jnp.concatenate([local, routed], axis=1))
        o_BxTxHxK = block_sparse_attention(q, k, v, block_indices, block_size=b, causal=True,
                                           segment_ids=segment_ids, implementation=c.implementation)
        if not self.deterministic:
            self._update_centroids(q_hat, k_hat_routed)
        return project("bthk,hkd->btd", o_BxTxHxK, self.w_o, c.dtype)

    # -- decoding ----------------------------------------------------------------------------------
    def init_cache(self, batch: int, max_len: int) -> dict:
        c = self.config
        shape = (batch, max_len, c.num_kv_heads, c.head_dim)
        return {"k": jnp.zeros(shape, c.dtype), "v": jnp.zeros(shape, c.dtype),
                "k_hat": jnp.zeros(shape, jnp.float32),
                "cluster": jnp.zeros((batch, c.num_routing_heads), jnp.int32), "end": jnp.zeros((), jnp.int32)}

    def _decode(self, x_BxTxD, cache):
        """One token at a time (a scan over the given tokens), reading the same blocks as the
        parallel form: the routing cluster of the current block is kept from its first token."""
        def one(cache, x_Bx1xD):
            y, cache = self._decode_token(x_Bx1xD, cache)
            return cache, y
        cache, ys = jax.lax.scan(one, cache, x_BxTxD.transpose(1, 0, 2)[:, :, None])
        return ys[:, :, 0].transpose(1, 0, 2), cache

    def _decode_token(self, x_Bx1xD, cache):
        c = self.config
        b = c.block_size
        B = x_Bx1xD.shape[0]
        t = cache["end"]
        q, k, v, q_hat, k_hat = self._project(x_Bx1xD, jnp.full((B, 1), t))
        k_cache = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, t, 0, 0))
        v_cache = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, t, 0, 0))
        k_hat_cache = jax.lax.dynamic_update_slice(cache["k_hat"], k_hat, (0, t, 0, 0))
        S = k_cache.shape[1]
        n = t // b
        new_cluster = jnp.argmax(self._centroid_scores(q_hat)[:, :, 0], axis=-1)
        cluster_BxR = jnp.where(t % b == 0, new_cluster, cache["cluster"])
        key_scores = self._key_block_scores(self._routing_keys(k_hat_cache))         # [B, R, M, C]
        M = key_scores.shape[2]
        routed = routed_block_indices(cluster_BxR[..., None], n[None], key_scores, jnp.ones((B, 1, M), bool), c.top_k)
        local = jnp.broadcast_to(local_blocks(n[None], 1), (B, c.num_local_heads, 1, 2))
        visible_BxHx1xS = jnp.concatenate([selection_mask(local, t[None], S, b), selection_mask(routed, t[None], S, b)],
                                          axis=1)
        o = attend_with_mask(q, k_cache, v_cache, visible_BxHx1xS, implementation="xla")
        y = project("bthk,hkd->btd", o, self.w_o, c.dtype)
        return y, {"k": k_cache, "v": v_cache, "k_hat": k_hat_cache, "cluster": cluster_BxR, "end": t + 1}
