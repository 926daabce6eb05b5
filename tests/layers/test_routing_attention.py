"""Routing attention (k-means routed heads + local heads), what is its own (the mixer contract:
causality, decoding, packing, jit, counts, sharding, is tests/layers/test_conformance.py): routed
blocks stay in cluster, past and segment, the k-means update law in training mode only, the dense
limit, and the train-step and checkpoint plumbing of its centroid state and commitment loss."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from hybrax.arch import ModelConfig
from hybrax.layers.auxiliary import RouterState, forward_with_auxiliaries
from hybrax.layers.sparse.block_selection import same_segment_candidates
from hybrax.layers.sparse.routing_attention import RoutingAttention, RoutingAttentionConfig, routed_block_indices

D = 32
CONFIG = RoutingAttentionConfig(d_model=D, num_heads=4, num_kv_heads=2, head_dim=8, block_size=8, top_k=2,
                                num_clusters=2, init_std=0.3)


@functools.cache
def build(config=CONFIG, seed=0):
    return RoutingAttention(config, rngs=nnx.Rngs(params=seed))


def jitted(layer):
    """`layer(x, segment_ids=..., positions=...)` under one jax.jit (eager dispatch is slow)."""
    graphdef, state = nnx.split(layer)
    call = jax.jit(lambda state, x, segment_ids, positions: nnx.merge(graphdef, state)(
        x, segment_ids=segment_ids, positions=positions))
    return lambda x, segment_ids=None, positions=None: call(state, x, segment_ids, positions)


def x_input(T, B=2, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(B, T, D)), jnp.float32)


def test_routed_blocks_stay_in_cluster_past_and_segment():
    """A hand-made case: query blocks 0..3, key blocks 0..3 with clusters [0, 1, 0, 0]."""
    key_scores = jnp.asarray([[0.9, 0.1], [0.2, 0.8], [0.5, 0.4], [0.7, 0.3]])[None, None]  # [1, 1, M, C]
    q_cluster = jnp.asarray([[[0, 1, 0, 0]]])
    anywhere = jnp.ones((1, 4, 4), bool)
    got = routed_block_indices(q_cluster, jnp.arange(4), key_scores, anywhere, top_k=2)[0, 0]
    # block 3 (cluster 0): past blocks of cluster 0 are 0 (0.9) and 2 (0.5); block 2: only 0; block 1 (cluster 1): none
    np.testing.assert_array_equal(got, [[-1, -1, 0], [-1, -1, 1], [0, -1, 2], [0, 2, 3]])
    segments = jnp.asarray([[1, 1, 2, 2]])   # blocks of one token; block 0 is in another segment than block 3
    valid = same_segment_candidates(segments, jnp.arange(4), 1)
    got = routed_block_indices(q_cluster, jnp.arange(4), key_scores, valid, top_k=2)[0, 0]
    np.testing.assert_array_equal(got[3], [2, -1, 3])


def test_one_cluster_and_every_block_is_dense_causal_attention():
    """num_clusters=1, top_k >= blocks, no local heads: every past block is routed, so the layer is
    softmax attention with the same weights (rotary included)."""
    from hybrax.layers.softmax.attention import Attention, AttentionConfig
    config = RoutingAttentionConfig(d_model=D, num_heads=4, num_kv_heads=2, head_dim=8, block_size=8, top_k=8,
                                    num_clusters=1, local_heads=0, init_std=0.3)
    layer = RoutingAttention(config, rngs=nnx.Rngs(params=0))
    dense = Attention(AttentionConfig(d_model=D, num_heads=4, num_kv_heads=2, head_dim=8), rngs=nnx.Rngs(params=1))
    for name in ("w_q", "w_k", "w_v", "w_o"):
        getattr(dense, name)[...] = getattr(layer, name)[...]
    x = x_input(45)
    np.testing.assert_allclose(jitted(layer)(x), jitted(dense)(x), atol=1e-5)


def kmeans_step(mu, vectors, decay):
    """One EMA k-means step in numpy, per head: mu [R, C, D], vectors [R, N, D] (unit)."""
    new = mu.copy()
    for r in range(mu.shape[0]):
        assign = np.argmax(vectors[r] @ mu[r].T, axis=1)
        for c in range(mu.shape[1]):
            members = vectors[r][assign == c]
            if len(members):
                moved = decay * mu[r, c] + (1 - decay) * members.mean(axis=0)
                new[r, c] = moved / np.linalg.norm(moved)
    return new


def test_centroids_follow_the_kmeans_law_in_training_mode_only():
    config = RoutingAttentionConfig(d_model=D, num_heads=4, num_kv_heads=2, head_dim=8, block_size=8, top_k=2,
                                    num_clusters=3, kmeans_decay=0.9, commitment_weight=0.5, init_std=0.3)
    layer = RoutingAttention(config, rngs=nnx.Rngs(params=0))
    x = x_input(24)
    mu = np.asarray(layer.centroids[...])
    layer(x)
    np.testing.assert_array_equal(layer.centroids[...], mu)               # evaluation mode: no update
    # the vectors the layer clusters: unit routing queries and unit keys of each routing head's kv head
    q = np.einsum("btd,dhk->bthk", np.asarray(x), np.asarray(layer.w_q[...]))[:, :, 2:]
    k = np.einsum("btd,dhk->bthk", np.asarray(x), np.asarray(layer.w_k[...]))[:, :, [1, 1]]
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)
    vectors = np.concatenate([unit(q), unit(k)], axis=1).transpose(2, 0, 1, 3).reshape(2, -1, 8)
    layer.train()
    _, losses, metrics = forward_with_auxiliaries(layer, x)
    np.testing.assert_allclose(layer.centroids[...], kmeans_step(mu, vectors, 0.9), atol=1e-5)
    nearest = np.take_along_axis(mu[:, None], np.argmax(vectors @ mu.transpose(0, 2, 1), -1)[..., None, None],
                                 axis=2)[:, :, 0]
    commitment = 0.5 * np.mean(np.sum((vectors - nearest) ** 2, axis=-1))
    np.testing.assert_allclose(losses["commitment"], commitment, rtol=1e-5)
    assert metrics["cluster_load_max_over_mean"] >= 1.0
    np.testing.assert_allclose(np.linalg.norm(layer.centroids[...], axis=-1), 1.0, atol=1e-6)


def test_train_step_updates_and_checkpoints_the_centroids(tmp_path):
    """The train step adds the commitment loss, logs it, carries the centroids across
    microbatches into the state, and a checkpoint restores them exactly."""
    from hybrax.train.checkpoint import Checkpointer
    from hybrax.train.config import CheckpointConfig, DataConfig, OptimConfig
    from hybrax.train.data import build_datasets
    from hybrax.train.optim import learning_rate_schedule, make_optimizer
    from hybrax.train.step import abstract_state, create_model, init_state, make_train_step

    model_config = ModelConfig(d_model=32, num_layers=2, num_heads=4, mixers=["routing_attention", "attention"],
                               routing_attention={"block_size": 8, "commitment_weight": 0.1}, kernels={"block_sparse_attention": "reference"})
    optim = OptimConfig(lr=1e-2, warmup_steps=1)
    optimizer = make_optimizer(optim, 10)
    graphdef, state = init_state(create_model(model_config, 0), optimizer)
    before = [np.asarray(x) for x in jax.tree.leaves(state.model_state)]  # the step donates the state
    step = make_train_step(graphdef, optimizer, learning_rate_schedule(optim, 10), grad_accum=2)
    batch = next(build_datasets(DataConfig(seq_len=32, batch_size=4), seed=0).train)
    state, metrics = step(state, batch)
    after = jax.tree.leaves(state.model_state)
    assert len(after) == 1 and not np.allclose(before[0], after[0])
    assert metrics["aux/blocks/0/mixer/commitment"] > 0
    np.testing.assert_allclose(metrics["aux_loss"], metrics["aux/blocks/0/mixer/commitment"], rtol=1e-6)
    assert "aux/blocks/0/mixer/cluster_load_max_over_mean" in metrics

    checkpointer = Checkpointer(tmp_path, CheckpointConfig(async_save=False))
    checkpointer.save(1, state, {"position": 0}, wait=True)
    _, target = abstract_state(model_config, optimizer)
    restored, _ = checkpointer.restore(1, target)
    checkpointer.close()
    np.testing.assert_array_equal(jax.tree.leaves(restored.model_state)[0], after[0])


def test_commitment_loss_reaches_the_gradient():
    """The aux loss enters the objective: its gradient w.r.t. w_q is what jax.grad of the reported
    loss alone gives."""
    layer = RoutingAttention(RoutingAttentionConfig(d_model=D, num_heads=4, num_kv_heads=2, head_dim=8,
                                                    block_size=8, commitment_weight=1.0, init_std=0.3),
                             rngs=nnx.Rngs(params=0))
    layer.train()
    graphdef, params, state = nnx.split(layer, nnx.Param, RouterState)
    x = x_input(16)

    def aux(params):
        module = nnx.merge(graphdef, params, state, copy=True)
        _, losses, _ = forward_with_auxiliaries(module, x)
        return losses["commitment"]

    grads = jax.grad(aux)(params)
    assert float(optax.tree.norm(grads["w_q"])) > 0 and float(optax.tree.norm(grads["w_v"])) == 0


def test_num_params_and_bad_config():
    layer = build()
    assert CONFIG.num_params() == sum(x.size for x in jax.tree.leaves(nnx.state(layer, nnx.Param)))
    with pytest.raises(ValueError, match="local_heads=4 must be in"):
        RoutingAttentionConfig(d_model=D, num_heads=4, num_kv_heads=2, head_dim=8, local_heads=4)
