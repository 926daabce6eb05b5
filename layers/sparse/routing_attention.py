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

Sequence parallelism (a mesh with seq > 1, no cache; x in zigzag order): the queries stay on their
device; K and V are all-gathered over seq in natural order (layers/sparse/gathered_keys.py)
and for routing only the key-block summaries travel: each device averages the unit keys of its own
blocks and all-gathers those means (1 / block_size of the unit keys). Every device routes and
attends for its own query blocks. Heads split over tensor as in attention: each local head is given
a routing slot and takes the routed or the local list by its index among all heads. The k-means
update runs outside on the global arrays (its sums do not depend on the token order). The zigzag
chunk (T / (2 seq)) must be a multiple of block_size.
"""

from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx
from pydantic import model_validator

from hybrax.layers.softmax.skeleton import SoftmaxConfig, SoftmaxMixer, append_to_cache
from hybrax.layers.auxiliary import RouterState, report_loss, report_metric
from hybrax.layers.sparse.block_selection import (attend_with_mask, block_mean, causal_top_k_blocks, local_blocks,
                                    same_segment_candidates, selection_mask)
from hybrax.layers.partitioned import block_sparse_attention
from hybrax.layers.sparse.gathered_keys import (attend_with_gathered_keys, gather_natural,
                                                    offset_implementation)
from hybrax.layers.sequence_parallel.layout import seq_size


class RoutingAttentionConfig(SoftmaxConfig):
    """Parameter budget: d_model * D * (2 H + 2 Hkv); plus Hr * C * D centroid state."""

    kernel: ClassVar[str] = "block_sparse_attention"
    tiny: ClassVar[dict] = {"block_size": 4, "num_clusters": 2}

    block_size: int = 16                # tokens per query block and per key block
    top_k: int = 2                      # in-cluster past blocks per query block; the current block is added
    num_clusters: int = 4               # k-means centroids per routing head
    local_heads: int | None = None      # heads reading blocks n-1 and n instead of routing (None: half)
    kmeans_decay: float = 0.999         # EMA decay of the centroids (training mode only)
    commitment_weight: float = 1e-4     # weight of the auxiliary k-means commitment loss (0: off)

    @model_validator(mode="after")
    def _check(self):
        if not 0 <= self.num_local_heads < self.num_heads:
            raise ValueError(f"local_heads={self.local_heads} must be in [0, num_heads={self.num_heads}) so that "
                             "at least one head routes")
        if self.num_clusters < 1 or self.top_k < 0 or self.block_size < 1:
            raise ValueError(f"num_clusters={self.num_clusters} must be >= 1, top_k={self.top_k} >= 0, "
                             f"block_size={self.block_size} >= 1")
        if not 0.0 <= self.kmeans_decay < 1.0:
            raise ValueError(f"kmeans_decay={self.kmeans_decay} must be in [0, 1)")
        return self

    @property
    def num_local_heads(self) -> int:
        return self.num_heads // 2 if self.local_heads is None else self.local_heads

    @property
    def num_routing_heads(self) -> int:
        return self.num_heads - self.num_local_heads

    def kv_cache_bytes_per_token(self) -> float:
        """Keys and values, and the normalized routing keys k_hat (float32)."""
        return super().kv_cache_bytes_per_token() + self.num_kv_heads * self.head_dim * 4

    def state_bytes_per_sequence(self) -> int:
        """The cluster of each routing head (int32)."""
        return self.num_routing_heads * 4

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


def _pad_heads(x, count: int, axis: int):
    """Zeros for `count` heads before the heads on `axis`."""
    return jnp.pad(x, [(count, 0) if dim == axis % x.ndim else (0, 0) for dim in range(x.ndim)])


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


class RoutingAttention(SoftmaxMixer):
    def __init__(self, config: RoutingAttentionConfig, *, rngs: nnx.Rngs):
        super().__init__(config, rngs=rngs)
        c = config
        centroids = jax.random.normal(rngs.params(), (c.num_routing_heads, c.num_clusters, c.head_dim))
        self.centroids = RouterState(_unit(centroids))
        self.deterministic = True   # training mode (model.train()) updates the centroids

    # -- shared pieces ---------------------------------------------------------------------------
    def token_inputs(self, x_BxTxD, q_BxTxHxD, k_BxTxGxD) -> dict:
        """The unit content vectors, before rotary (every head's; the local heads' go unused)."""
        return {"q_hat_BxTxHxD": _unit(q_BxTxHxD), "k_hat_BxTxGxD": _unit(k_BxTxGxD)}

    def _routing_keys(self, k_hat_BxTxGxD):
        """Each routing head's view of the unit keys, [B, T, Hr, D] (grouped-query heads)."""
        c = self.config
        group = c.num_heads // c.num_kv_heads
        kv_head = (jnp.arange(c.num_local_heads, c.num_heads) // group)
        return k_hat_BxTxGxD[:, :, kv_head]

    def _centroids(self):
        return jax.lax.stop_gradient(self.centroids[...])

    @staticmethod
    def _key_block_scores(key_means_BxMxRxD, centroids_RxCxD):
        """mu_{h, c} . kbar_m, [B, Hr, M, C], with kbar_m the unit mean of block m's unit keys (from
        the block means `block_mean(k_hat)`)."""
        return jnp.einsum("bmrd,rcd->brmc", _unit(key_means_BxMxRxD), centroids_RxCxD)

    # -- training-time k-means -------------------------------------------------------------------
    def _update_centroids(self, q_hat_BxTxHxD, k_hat_BxTxGxD):
        """Online k-means step over the routing heads' unit queries and keys, written over all H heads
        (the local heads count nowhere and their rows are dropped at the end), so heads split over
        tensor never gather: only the [Hr, C, D] sums are shared."""
        c = self.config
        L, R, group = c.num_local_heads, c.num_routing_heads, c.num_heads // c.num_kv_heads
        # queries and keys side by side on a new axis, not concatenated along the (seq-split) time
        x_hat = jnp.stack([q_hat_BxTxHxD, jnp.repeat(k_hat_BxTxGxD, group, axis=2)], axis=1)   # [B, 2, T, H, D]
        mu = self.centroids[...]
        mu_HxCxD = _pad_heads(mu, L, axis=0)
        routing_H = (jnp.arange(c.num_heads) >= L).astype(jnp.float32)
        assign = jnp.argmax(jnp.einsum("bsthd,hcd->bshtc", jax.lax.stop_gradient(x_hat), mu_HxCxD), axis=-1)
        onehot_Bx2xHxTxC = jax.nn.one_hot(assign, c.num_clusters, dtype=jnp.float32) * routing_H[:, None, None]
        if c.commitment_weight:
            nearest_Bx2xTxHxD = jnp.einsum("bshtc,hcd->bsthd", onehot_Bx2xHxTxC, mu_HxCxD)
            gap = x_hat - nearest_Bx2xTxHxD
            B, _, T = x_hat.shape[:3]
            commitment = jnp.sum(jnp.sum(gap * gap, axis=-1) * routing_H) / (B * R * 2 * T)
            report_loss(self, "commitment", c.commitment_weight * commitment)
        counts_RxC = onehot_Bx2xHxTxC.sum(axis=(0, 1, 3))[L:]
        sums_RxCxD = jnp.einsum("bshtc,bsthd->hcd", onehot_Bx2xHxTxC, jax.lax.stop_gradient(x_hat))[L:]
        means = sums_RxCxD / jnp.maximum(counts_RxC, 1.0)[..., None]
        moved = _unit(c.kmeans_decay * mu + (1.0 - c.kmeans_decay) * means)
        self.centroids[...] = jnp.where(counts_RxC[..., None] > 0, moved, mu)
        report_metric(self, "cluster_load_max_over_mean", jnp.max(counts_RxC) / jnp.mean(counts_RxC))

    # -- forward: the skeleton's paths (layers/softmax/skeleton.py) -------------------------------
    def attend(self, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids, *, q_hat_BxTxHxD, k_hat_BxTxGxD):
        """The all-heads form of the sequence-parallel path, so that heads split over tensor keep
        their routing local."""
        c = self.config
        L, group = c.num_local_heads, c.num_heads // c.num_kv_heads
        key_means_BxNxHxD = jnp.repeat(block_mean(k_hat_BxTxGxD, c.block_size), group, axis=2)
        o_BxTxHxK = self._attend_blocks(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids, segment_ids,
                                        q_hat_BxTxRxD=q_hat_BxTxHxD, key_means_BxNxRxD=key_means_BxNxHxD,
                                        centroids_RxCxD=_pad_heads(self._centroids(), L, axis=0),
                                        routing_H=jnp.arange(c.num_heads) >= L)
        self._train_centroids(q_hat_BxTxHxD, k_hat_BxTxGxD)
        return o_BxTxHxK

    def attend_sequence_parallel(self, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids, *, q_hat_BxTxHxD,
                                 k_hat_BxTxGxD):
        # every head gets a routing slot (zeros for the local heads), so the heads split over tensor
        extras = {"q_hat_BxTxHxD": (q_hat_BxTxHxD, ("batch", "length", "heads", None)),
                  "k_hat_BxTxGxD": (k_hat_BxTxGxD, ("batch", "length", "kv_heads", None)),
                  "centroids_HxCxD": (_pad_heads(self._centroids(), self.config.num_local_heads, axis=0),
                                      ("heads", None, None))}
        o_BxTxHxK = attend_with_gathered_keys(self._attend_gathering_means, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK,
                                              segment_ids, block=self.config.block_size, extras=extras)
        self._train_centroids(q_hat_BxTxHxD, k_hat_BxTxGxD)
        return o_BxTxHxK

    def _train_centroids(self, q_hat_BxTxHxD, k_hat_BxTxGxD):
        if not self.deterministic:
            self._update_centroids(q_hat_BxTxHxD, k_hat_BxTxGxD)

    def _attend_blocks(self, q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, q_segment_ids, kv_segment_ids, query_block_Q=None,
                       head_axes=None, *, q_hat_BxTxRxD, key_means_BxNxRxD, centroids_RxCxD, routing_H=None):
        """The parallel form for the query blocks `query_block_Q` (natural block index of each block
        of q; None: q holds every position, T == S) against all S keys, routed by the queries' unit
        vectors q_hat and the means of the keys' unit vectors per key block (all N blocks), for R
        routed heads. routing_H None: the R = Hr routing heads follow the local ones; else R = H and
        the bool mask [H] says which heads route (the others take the local window)."""
        c = self.config
        b = c.block_size
        B = q_BxTxHxK.shape[0]
        offset = query_block_Q
        query_block_Q = jnp.arange(-(-q_BxTxHxK.shape[1] // b)) if offset is None else offset
        Q, N = query_block_Q.shape[0], key_means_BxNxRxD.shape[1]
        q_cluster_BxRxQ = jnp.argmax(jnp.einsum("bqrd,rcd->brqc", q_hat_BxTxRxD[:, ::b], centroids_RxCxD), axis=-1)
        key_scores = self._key_block_scores(key_means_BxNxRxD, centroids_RxCxD)
        valid_BxQxN = (jnp.ones((B, Q, N), bool) if kv_segment_ids is None
                       else same_segment_candidates(kv_segment_ids, query_block_Q * b, b))
        routed = routed_block_indices(q_cluster_BxRxQ, query_block_Q, key_scores, valid_BxQxN, c.top_k)
        local = jnp.full((Q, c.top_k + 1), -1, jnp.int32).at[:, :2].set(local_blocks(query_block_Q, 1))
        if routing_H is None:
            local = jnp.broadcast_to(local, (B, c.num_local_heads, Q, c.top_k + 1))
            block_indices = jax.lax.stop_gradient(jnp.concatenate([local, routed], axis=1))
        else:
            block_indices = jax.lax.stop_gradient(jnp.where(routing_H[:, None, None], routed, local))
        return block_sparse_attention(
            q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, block_indices, block_size=b, causal=True, segment_ids=q_segment_ids,
            kv_segment_ids=None if offset is None else kv_segment_ids, query_blocks=offset,
            implementation=c.implementation if offset is None else offset_implementation(c.implementation))

    def _attend_gathering_means(self, q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, q_segment_ids, kv_segment_ids, query_block_Q,
                                head_axes, *, q_hat_BxTxHxD, k_hat_BxTxGxD, centroids_HxCxD):
        """`_attend_blocks` inside shard_map over seq: each device averages the unit keys of its own
        key blocks and all-gathers those means (1 / block of the unit keys), not the unit keys. Every
        local head has a routing slot (centroids zero for the local heads); which of them
        route follows from their index in the whole set of heads."""
        H, G = q_BxTxHxK.shape[2], k_BxSxGxK.shape[2]
        key_means_BxNxGxD = gather_natural(block_mean(k_hat_BxTxGxD, self.config.block_size), seq_size())
        first_head = 0 if head_axes is None else jax.lax.axis_index(head_axes) * H
        routing_H = first_head + jnp.arange(H) >= self.config.num_local_heads
        key_means_BxNxHxD = jnp.repeat(key_means_BxNxGxD, H // G, axis=2)
        return self._attend_blocks(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, q_segment_ids, kv_segment_ids, query_block_Q,
                                   q_hat_BxTxRxD=q_hat_BxTxHxD, key_means_BxNxRxD=key_means_BxNxHxD,
                                   centroids_RxCxD=centroids_HxCxD, routing_H=routing_H)

    # -- decoding ----------------------------------------------------------------------------------
    def cache_state(self, batch: int, max_len: int) -> dict:
        """k_hat: the unit keys; cluster: each routing head's cluster of the current block."""
        c = self.config
        return {"k_hat": jnp.zeros((batch, max_len, c.num_kv_heads, c.head_dim), jnp.float32),
                "cluster": jnp.zeros((batch, c.num_routing_heads), jnp.int32)}

    def __call__(self, x_BxTxD, *, segment_ids=None, positions=None, cache=None):
        """Decoding runs one token at a time (a scan over the given tokens), reading the same blocks
        as the parallel form: the routing cluster of the current block is kept from its first token."""
        skeleton = super().__call__
        if cache is None or segment_ids is not None:   # (the skeleton refuses segment_ids with a cache)
            return skeleton(x_BxTxD, segment_ids=segment_ids, positions=positions, cache=cache)

        def one(cache, token):
            x_Bx1xD, positions_Bx1 = token
            y, cache = skeleton(x_Bx1xD, positions=positions_Bx1, cache=cache)
            return cache, y
        per_token = lambda a: None if a is None else jnp.swapaxes(a, 0, 1)[:, :, None]  # noqa: E731
        cache, ys = jax.lax.scan(one, cache, (per_token(x_BxTxD), per_token(positions)))
        return ys[:, :, 0].transpose(1, 0, 2), cache

    def attend_cached(self, q, k_cache, v_cache, position_T, cache, *, q_hat_BxTxHxD, k_hat_BxTxGxD):
        """One token (T = 1, the scan of `__call__`) against the cache."""
        c = self.config
        b = c.block_size
        B = q.shape[0]
        t = cache["end"]
        k_hat_cache = append_to_cache(cache["k_hat"], k_hat_BxTxGxD, t)
        S = k_cache.shape[1]
        n = t // b
        centroids_RxCxD = self._centroids()
        q_hat_routed = q_hat_BxTxHxD[:, :, c.num_local_heads:]
        new_cluster = jnp.argmax(jnp.einsum("btrd,rcd->brtc", q_hat_routed, centroids_RxCxD)[:, :, 0], axis=-1)
        cluster_BxR = jnp.where(t % b == 0, new_cluster, cache["cluster"])
        key_scores = self._key_block_scores(block_mean(self._routing_keys(k_hat_cache), b), centroids_RxCxD)
        M = key_scores.shape[2]
        routed = routed_block_indices(cluster_BxR[..., None], n[None], key_scores, jnp.ones((B, 1, M), bool), c.top_k)
        local = jnp.broadcast_to(local_blocks(n[None], 1), (B, c.num_local_heads, 1, 2))
        visible_BxHx1xS = jnp.concatenate([selection_mask(local, t[None], S, b), selection_mask(routed, t[None], S, b)],
                                          axis=1)
        o = attend_with_mask(q, k_cache, v_cache, visible_BxHx1xS, implementation="xla")
        return o, {"k_hat": k_hat_cache, "cluster": cluster_BxR}
