"""block_sparse_attention: laws of the reference (every block listed == dense causal attention,
empty rows give zeros with finite gradients, duplicates count once, GQA == repeated k/v heads),
the xla implementation against the reference on every shared case (outputs and dq, dk, dv) and
under jit and vmap, queries at a block offset (query_blocks, kv_segment_ids), the one-line input
errors, and the implementation switch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrax.pallas_kernels.block_sparse_attention import block_sparse_attention
from hybrax.pallas_kernels.dot_product_attention import dot_product_attention
from block_sparse_attention_cases import CASES, Case, assert_matches_reference, make_inputs, relative_error

LAW_IMPLEMENTATIONS = ["reference", "xla"]  # the laws hold for the oracle and for the fast path


def _arrays(case: Case):
    x = make_inputs(case)
    seg = None if x["segment_ids"] is None else jnp.asarray(x["segment_ids"])
    return jnp.asarray(x["q"]), jnp.asarray(x["k"]), jnp.asarray(x["v"]), jnp.asarray(x["block_indices"]), seg


def _grads(impl, q, k, v, idx, **kw):
    w = jnp.cos(jnp.arange(q.size, dtype=jnp.float32)).reshape(q.shape)
    loss = lambda q, k, v: jnp.sum(block_sparse_attention(q, k, v, idx, implementation=impl, **kw) * w)
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


# --- laws -------------------------------------------------------------------------------------

@pytest.mark.parametrize("segments", [False, True])
def test_reference_with_every_block_is_dense_causal_attention(segments):
    """Law: every key block listed, causal -> dense causal softmax attention (to float32 roundoff),
    with GQA, T not a multiple of the blocks, unequal block sizes and packed segments."""
    q, k, v, _, seg = _arrays(Case(37, segments=segments, B=2, H=4, Hkv=2))
    idx = jnp.broadcast_to(jnp.arange(-(-37 // 4), dtype=jnp.int32), (2, 4, -(-37 // 8), 10))
    got = block_sparse_attention(q, k, v, idx, block_size=(8, 4), segment_ids=seg, implementation="reference")
    want = dot_product_attention(q, k, v, causal=True, segment_ids=seg, implementation="reference")
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", LAW_IMPLEMENTATIONS)
def test_empty_rows_give_zeros_and_finite_gradients(impl):
    """Law: a query block whose slots are all -1 outputs exactly 0, its queries get dq = 0, and
    no gradient anywhere is NaN or inf."""
    q, k, v, idx, _ = _arrays(Case(40, n_sel=2, B=1, H=2, Hkv=1))
    idx = idx.at[:, 0, 1].set(-1)  # head 0, query block 1 (rows 16..31) lists nothing
    o = block_sparse_attention(q, k, v, idx, block_size=16, implementation=impl)
    assert np.all(np.asarray(o[:, 16:32, 0]) == 0.0)
    assert np.all(np.isfinite(np.asarray(o)))
    dq, dk, dv = _grads(impl, q, k, v, idx, block_size=16)
    for g in (dq, dk, dv):
        assert np.all(np.isfinite(np.asarray(g)))
    assert np.all(np.asarray(dq[:, 16:32, 0]) == 0.0)
    all_empty = jnp.full_like(idx, -1)
    assert np.all(np.asarray(block_sparse_attention(q, k, v, all_empty, block_size=16, implementation=impl)) == 0)
    for g in _grads(impl, q, k, v, all_empty, block_size=16):
        assert np.all(np.asarray(g) == 0.0)


@pytest.mark.parametrize("impl", LAW_IMPLEMENTATIONS)
def test_a_block_listed_twice_counts_once(impl):
    """Law: lists [a, a, b] and [a, b, -1] give the same output and gradients."""
    q, k, v, _, _ = _arrays(Case(64, B=1, H=2, Hkv=2))
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 4, (2, 1, 2, 4))
    twice = jnp.asarray(np.stack([a, a, b], axis=-1), jnp.int32)
    once = jnp.asarray(np.stack([a, np.where(b == a, -1, b), np.full_like(a, -1)], axis=-1), jnp.int32)
    kw = dict(block_size=16, causal=False)
    np.testing.assert_allclose(block_sparse_attention(q, k, v, twice, implementation=impl, **kw),
                               block_sparse_attention(q, k, v, once, implementation=impl, **kw), rtol=1e-6, atol=1e-6)
    for g_twice, g_once in zip(_grads(impl, q, k, v, twice, **kw), _grads(impl, q, k, v, once, **kw)):
        np.testing.assert_allclose(g_twice, g_once, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", LAW_IMPLEMENTATIONS)
def test_grouped_queries_equal_repeated_kv_heads(impl):
    """Law: H = 4 query heads on Hkv = 2 key/value heads == the same with k, v repeated to 4 heads
    (query head h reads kv head h // 2), for the output and dq."""
    q, k, v, idx, seg = _arrays(Case(50, lists="causal_random", segments=True, B=2, H=4, Hkv=2))
    kw = dict(block_size=16, segment_ids=seg)
    repeat = lambda x: jnp.repeat(x, 2, axis=2)
    got = block_sparse_attention(q, k, v, idx, implementation=impl, **kw)
    want = block_sparse_attention(q, repeat(k), repeat(v), idx, implementation=impl, **kw)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_grads(impl, q, k, v, idx, **kw)[0],
                               _grads(impl, q, repeat(k), repeat(v), idx, **kw)[0], rtol=1e-5, atol=1e-6)


# --- xla against the reference -----------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_xla_matches_reference(case):
    assert_matches_reference("xla", case)


def test_xla_jit_equals_eager_and_vmap_equals_loop():
    """jit == eager (outputs and gradients); vmap over a leading axis == one call per slice."""
    q, k, v, idx, seg = _arrays(Case(65, lists="causal_random", segments=True))
    run = lambda q, k, v, idx, seg: block_sparse_attention(q, k, v, idx, block_size=16, segment_ids=seg)
    np.testing.assert_allclose(jax.jit(run)(q, k, v, idx, seg), run(q, k, v, idx, seg), rtol=1e-6, atol=1e-6)
    eager = _grads("xla", q, k, v, idx, block_size=16, segment_ids=seg)
    jitted = jax.jit(lambda q, k, v: _grads("xla", q, k, v, idx, block_size=16, segment_ids=seg))(q, k, v)
    for a, b in zip(eager, jitted):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    stack = lambda x: jnp.stack([x, jnp.flip(x, axis=1) if x.ndim == 4 and x.dtype != jnp.int32 else x])
    batched = jax.vmap(run)(*(stack(x) for x in (q, k, v, idx, seg)))
    for i in range(2):
        one = run(*(stack(x)[i] for x in (q, k, v, idx, seg)))
        np.testing.assert_allclose(batched[i], one, rtol=1e-6, atol=1e-6)


def test_xla_many_chunks_match_reference(monkeypatch):
    """Rows are scanned in chunks of SCORE_BUDGET scores (one chunk for most small cases): with a
    tiny budget the chunked scan, the padding rows and the scattered dK, dV carry are exercised."""
    from hybrax.pallas_kernels.block_sparse_attention import xla
    monkeypatch.setattr(xla, "SCORE_BUDGET", 3 * 16 * 3 * 16)  # 3 rows per chunk, R = 2 * 4 * 5 = 40
    assert_matches_reference("xla", Case(65, lists="causal_random", segments=True, seed=5))


# --- queries at a block offset (sequence parallelism: a device's rows against all keys) ----------

def _query_subset(impl, rows_blocks, bq=16, bk=8):
    """The op on the query blocks `rows_blocks` only (in that order, as a zigzag shard holds them),
    with query_blocks and kv_segment_ids: (output, dq, dk, dv of sum(o * w))."""
    q, k, v, idx, seg = _arrays(Case(64, block_q=bq, block_k=bk, lists="causal_random", n_sel=4, segments=True))
    blocks = jnp.asarray(rows_blocks, jnp.int32)
    rows = (blocks[:, None] * bq + jnp.arange(bq)).reshape(-1)
    kw = dict(block_size=(bq, bk), segment_ids=seg[:, rows], kv_segment_ids=seg, query_blocks=blocks)
    sub = lambda q, k, v: block_sparse_attention(q, k, v, idx[:, :, blocks], implementation=impl, **kw)  # noqa: E731
    w = jnp.sin(jnp.arange(q[:, rows].size, dtype=jnp.float32)).reshape(q[:, rows].shape)
    grads = jax.grad(lambda q, k, v: jnp.sum(sub(q, k, v) * w), argnums=(0, 1, 2))(q[:, rows], k, v)
    full = block_sparse_attention(q, k, v, idx, block_size=(bq, bk), segment_ids=seg, implementation="reference")
    return sub(q[:, rows], k, v), grads, full[:, rows]


@pytest.mark.parametrize("rows_blocks", [[0, 3], [1, 2], [3, 1]])
def test_query_blocks_give_the_rows_of_the_full_sequence(rows_blocks):
    """Law: the op on a subset of the query blocks (zigzag shards [0, 3] and [1, 2] of 4 blocks, and
    an arbitrary order) with query_blocks / kv_segment_ids == those rows of the full op; xla ==
    reference there for the output and dq, dk, dv."""
    o_ref, grads_ref, want = _query_subset("reference", rows_blocks)
    np.testing.assert_allclose(o_ref, want, rtol=1e-6, atol=1e-6)
    o_xla, grads_xla, _ = _query_subset("xla", rows_blocks)
    assert relative_error(o_xla, o_ref) <= 1e-5
    for got, ref in zip(grads_xla, grads_ref):
        assert relative_error(got, ref) <= 1e-5


def test_pallas_refuses_query_blocks_and_the_switch_falls_through_to_xla():
    q, k, v, idx = _small()
    blocks = jnp.asarray([1, 0], jnp.int32)
    forced = lambda impl: block_sparse_attention(q, k, v, idx, block_size=16, query_blocks=blocks,  # noqa: E731
                                                 implementation=impl)
    with pytest.raises(NotImplementedError, match="query_blocks"):
        forced("pallas_tpu")
    np.testing.assert_array_equal(forced(["pallas_tpu", "xla"]), forced("xla"))


# --- input errors and the implementation switch ------------------------------------------------

def _small():
    q, k, v, idx, _ = _arrays(Case(32, B=1, H=4, Hkv=2))
    return q, k, v, idx  # block 16: idx [1, 4, 2, 3]


@pytest.mark.parametrize("change,message", [
    (lambda q, k, v, idx: dict(block_size=(16, 0)), "block_size"),
    (lambda q, k, v, idx: dict(block_size=(16, 16, 16)), "block_size"),
    (lambda q, k, v, idx: dict(block_size=16.0), "block_size"),
    (lambda q, k, v, idx: dict(block_indices=idx[:, :, :1]), "block_indices shape"),
    (lambda q, k, v, idx: dict(block_indices=idx[0]), "block_indices shape"),
    (lambda q, k, v, idx: dict(block_indices=idx.astype(jnp.float32)), "block_indices dtype"),
    (lambda q, k, v, idx: dict(block_indices=idx.at[0, 0, 0, 0].set(2)), r"block_indices range"),
    (lambda q, k, v, idx: dict(block_indices=idx.at[0, 0, 0, 0].set(-2)), r"block_indices range"),
    (lambda q, k, v, idx: dict(k=k[:, :, :1].repeat(3, axis=2), v=v[:, :, :1].repeat(3, axis=2)), "multiple"),
    (lambda q, k, v, idx: dict(k=k[:, :16], v=v[:, :16], block_indices=jnp.minimum(idx, 0),
                               segment_ids=jnp.zeros((1, 32), jnp.int32)), "segment_ids"),
    (lambda q, k, v, idx: dict(query_blocks=jnp.zeros((3,), jnp.int32)), "query_blocks"),
    (lambda q, k, v, idx: dict(query_blocks=jnp.zeros((2,), jnp.float32)), "query_blocks"),
    (lambda q, k, v, idx: dict(kv_segment_ids=jnp.zeros((1, 32), jnp.int32)), "kv_segment_ids"),
    (lambda q, k, v, idx: dict(segment_ids=jnp.zeros((1, 32), jnp.int32),
                               kv_segment_ids=jnp.zeros((1, 16), jnp.int32)), "kv_segment_ids"),
])
def test_invalid_inputs_raise_one_line_value_error(change, message):
    q, k, v, idx = _small()
    args = dict(q=q, k=k, v=v, block_indices=idx, block_size=16)
    args.update(change(q, k, v, idx))
    with pytest.raises(ValueError, match=message) as info:
        block_sparse_attention(**args)
    assert "\n" not in str(info.value)


def test_default_on_cpu_is_xla_and_unknown_names_raise():
    q, k, v, idx = _small()
    if jax.default_backend() == "cpu":
        default = block_sparse_attention(q, k, v, idx, block_size=16)
        forced = block_sparse_attention(q, k, v, idx, block_size=16, implementation="xla")
        np.testing.assert_array_equal(default, forced)
    with pytest.raises(ValueError, match="unknown"):
        block_sparse_attention(q, k, v, idx, block_size=16, implementation="no_such_kernel")
