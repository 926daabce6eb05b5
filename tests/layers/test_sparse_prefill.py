"""Training-free block selectors (XAttention, MInference vertical-slash, FlexPrefill): valid causal
index lists with the diagonal, the full causal set (and dense attention) at a keep-everything
budget, the planted blocks found, recall monotone in the budget, jit == eager, xattention on a
subset of the query blocks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrax.layers.softmax.attention import Attention, AttentionConfig
from hybrax.layers.sparse.prefill import SELECTORS, blocks, check_options

B, T, H, G, D, BLOCK = 2, 100, 4, 2, 16, 16   # 7 blocks, the last one partial
N = -(-T // BLOCK)
KEEP_ALL = {"xattention": {"threshold": 1.0}, "minference": {"vertical_size": T, "slash_size": 0},
            "flexprefill": {"gamma": 1.0}}
# budgets from small to large, per selector
BUDGETS = {"xattention": [{"threshold": t} for t in (0.3, 0.6, 0.8, 0.9, 0.99)],
           "minference": [{"vertical_size": v, "slash_size": s} for v, s in ((1, 1), (4, 8), (8, 16), (16, 40))],
           "flexprefill": [{"gamma": g, "js_threshold": None} for g in (0.3, 0.6, 0.8, 0.9, 0.99)]
                          + [{"gamma": g} for g in (0.3, 0.6, 0.9, 0.99)]}
SMALL = {"minference": {"vertical_size": 8, "slash_size": 16}}   # paper sizes keep everything at T=100


def inputs(seed=0, sharpness=2.0):
    rng = np.random.default_rng(seed)
    q = sharpness * rng.normal(size=(B, T, H, D))
    return jnp.asarray(q, jnp.float32), jnp.asarray(rng.normal(size=(B, T, G, D)), jnp.float32)


def listed(block_indices):
    """Bool [B, H, N, N] from an index list."""
    return np.asarray(jnp.any(block_indices[..., None] == jnp.arange(N), axis=-2))


@pytest.mark.parametrize("name", sorted(SELECTORS))
def test_lists_are_valid_causal_with_diagonal(name):
    q, k = inputs()
    seg = jnp.asarray([[1] * 40 + [2] * 60, [1] * 100], jnp.int32)
    for segment_ids in (None, seg):
        idx = np.asarray(SELECTORS[name](q, k, block_size=BLOCK, segment_ids=segment_ids, **SMALL.get(name, {})))
        assert idx.shape == (B, H, N, N) and idx.dtype == np.int32
        assert idx.min() >= -1 and idx.max() < N
        n_NxS = np.arange(N)[:, None]
        assert np.all((idx <= n_NxS) | (idx == -1)), "a block beyond the diagonal is listed"
        assert np.all(np.any(idx == n_NxS, axis=-1)), "the diagonal block is missing"
    # segments: query blocks 3.. of row 0 (tokens >= 48, segment 2) never list blocks 0, 1 (segment 1 only)
    assert not np.any(listed(jnp.asarray(idx))[0, :, 3:, :2])


@pytest.mark.parametrize("name", sorted(SELECTORS))
def test_keep_everything_budget_is_dense(name):
    """Law: with a budget that keeps every block, the list is the full causal set and the layer
    equals dense attention."""
    q, k = inputs()
    idx = SELECTORS[name](q, k, block_size=BLOCK, **KEEP_ALL[name])
    np.testing.assert_array_equal(listed(idx), np.broadcast_to(np.tril(np.ones((N, N), bool)), (B, H, N, N)))
    config = AttentionConfig(d_model=32, num_heads=H, num_kv_heads=G, head_dim=8)
    dense = Attention(config, rngs=nnx.Rngs(0))
    sparse = Attention(AttentionConfig(**{**config.__dict__, "prefill_selector": name, "prefill_block_size": BLOCK,
                                          "prefill_options": tuple(KEEP_ALL[name].items()),
                                          "prefill_implementation": "reference"}), rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(B, 37, 32)), jnp.float32)
    np.testing.assert_allclose(sparse(x), dense(x), atol=2e-6)


@pytest.mark.parametrize("name", sorted(SELECTORS))
def test_finds_planted_blocks(name):
    """Keys of block 2 and queries of blocks 4..6 share a strong direction: those query blocks put
    nearly all their mass on key block 2, and the selector lists it (with few other blocks)."""
    rng = np.random.default_rng(3)
    q = 0.3 * rng.normal(size=(B, T, H, D))
    k = 0.3 * rng.normal(size=(B, T, G, D))
    u = rng.normal(size=D) / np.sqrt(D) * 6.0
    k[:, 2 * BLOCK:3 * BLOCK] += u
    q[:, 4 * BLOCK:] += u
    q, k = jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32)
    recall = blocks.attention_recall(q, k, jnp.broadcast_to(jnp.asarray([2, -1], jnp.int32), (B, H, N, 2)), BLOCK)
    assert float(recall[:, :, 4 * BLOCK:].min()) > 0.95    # the planted structure holds
    # the planted structure is vertical lines; slash lines would spend their budget on the offsets
    # that cross block 2 from each row, touching other tiles
    budget = {"vertical_size": 8, "slash_size": 0} if name == "minference" else {}
    chosen = listed(SELECTORS[name](q, k, block_size=BLOCK, **budget))
    assert chosen[:, :, 4:, 2].all()
    assert chosen[:, :, 4:].sum(-1).max() <= 2 + (name == "minference")   # planted, diagonal (+ sink block 0)


@pytest.mark.parametrize("name", sorted(SELECTORS))
def test_recall_monotone_in_budget(name):
    q, k = inputs(seed=5, sharpness=3.0)
    for group in ([b for b in BUDGETS[name] if b.get("js_threshold", 0) is None],
                  [b for b in BUDGETS[name] if b.get("js_threshold", 0) is not None]):
        if not group:
            continue
        recalls, densities = [], []
        for budget in group:
            idx = SELECTORS[name](q, k, block_size=BLOCK, **budget)
            recalls.append(float(blocks.attention_recall(q, k, idx, BLOCK).mean()))
            densities.append(float(blocks.causal_density(idx)))
        assert np.all(np.diff(recalls) >= -1e-6), (group, recalls)
        assert np.all(np.diff(densities) >= 0), (group, densities)
        assert densities[0] < densities[-1]                  # the budget does something on this input


@pytest.mark.parametrize("name", sorted(SELECTORS))
def test_jit_equals_eager(name):
    q, k = inputs(seed=7, sharpness=3.0)
    seg = jnp.asarray([[1] * 50 + [2] * 50] * B, jnp.int32)
    select = functools.partial(SELECTORS[name], block_size=BLOCK, **SMALL.get(name, {}))
    np.testing.assert_array_equal(jax.jit(select)(q, k, segment_ids=seg), select(q, k, segment_ids=seg))


def test_xattention_on_some_query_blocks_gives_their_rows():
    """Law: xattention given only the rows of some query blocks (query_blocks, in any order, as a
    sequence-parallel device holds them) and all keys lists exactly those rows of the full answer."""
    q, k = inputs(seed=3)
    seg = jnp.asarray([[1] * 40 + [2] * 60, [1] * 100], jnp.int32)
    full = SELECTORS["xattention"](q[:, :96], k[:, :96], block_size=BLOCK, threshold=0.8, segment_ids=seg[:, :96])
    for query_blocks in ([0, 5], [2, 3], [4, 1, 0]):
        rows = (np.asarray(query_blocks)[:, None] * BLOCK + np.arange(BLOCK)).reshape(-1)
        some = SELECTORS["xattention"](q[:, rows], k[:, :96], block_size=BLOCK, threshold=0.8, segment_ids=seg[:, :96],
                                       query_blocks=jnp.asarray(query_blocks, jnp.int32))
        np.testing.assert_array_equal(some, full[:, :, np.asarray(query_blocks)])


def test_vertical_slash_block_conversion():
    """A diagonal at offset o touches tiles at block distance o // b and, unless b divides o, the next."""
    b, n = 4, 5
    cols = jnp.zeros((1, 1, 20), bool)
    for offset, distances in ((0, {0}), (4, {1}), (5, {1, 2}), (3, {0, 1})):
        got = np.asarray(blocks.vertical_slash_to_blocks(cols, cols.at[..., offset].set(True), b, n))[0, 0]
        want = np.array([[i - j in distances for j in range(n)] for i in range(n)])
        np.testing.assert_array_equal(got, want)
    got = np.asarray(blocks.vertical_slash_to_blocks(cols.at[..., 9].set(True), cols, b, n))[0, 0]
    np.testing.assert_array_equal(got, np.array([[j == 2 and i >= 2 for j in range(n)] for i in range(n)]))


def test_errors_name_the_value():
    q, k = inputs()
    with pytest.raises(ValueError, match="stride=5"):
        SELECTORS["xattention"](q, k, block_size=16, stride=5)
    with pytest.raises(ValueError, match="'tau' is not a knob of 'flexprefill'"):
        check_options("flexprefill", {"tau": 0.1})
    with pytest.raises(ValueError, match="'xattention', 'minference' or 'flexprefill'"):
        AttentionConfig(d_model=32, num_heads=4, num_kv_heads=4, head_dim=8, prefill_selector="dense")
    with pytest.raises(ValueError, match="T=100, S=50"):
        SELECTORS["minference"](q, k[:, :50], block_size=16)
