"""linear_attention: the reference against a plain numpy loop, every implementation against the
float64 reference (outputs, final state, all gradients) over odd lengths, the three decay forms,
packed segments, initial state, strong gates, bfloat16 and chunk sizes that do and do not divide
T; laws (packing == separate runs, chunk-size invariance); and the one-line input errors."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrax.pallas_kernels.linear_attention import linear_attention, xla
from linear_attention_cases import REFUSED, Case, assert_matches_reference, make_inputs
from reference_checks import float32_inputs
from refusals import expect_refusal_or_run

IMPLEMENTATIONS = ["xla"] + [
    name for name, module in (("pallas_tpu", "tpu"), ("pallas_gpu", "gpu"))
    if importlib.util.find_spec(f"hybrax.pallas_kernels.linear_attention.{module}") is not None]

# Every length, decay form and feature at least once (xla runs all of these by default).
CORE = [
    Case(1, "channel"),
    Case(63, "scalar", segments=True),
    Case(64, None, segments=True),
    Case(65, "channel", segments=True),  # xla: exact per-channel form (decay span > 40 per chunk)
    Case(257, "scalar", segments=True),  # chunk of 64 does not divide T
    Case(64, "channel", segments=True, chunk_size=16),  # chunk divides T
    Case(257, "channel", segments=True, decay_min=-0.5),  # GLA-like gates: xla's factored form
    Case(100, "scalar", segments=True, chunk_size=32, decay_min=-20.0),  # strong gates
    Case(100, "channel", segments=True, decay_min=-20.0),
    Case(65, "scalar", segments=True, dtype="bfloat16"),
    Case(65, "channel", segments=True, dtype="bfloat16"),
]
# Slow: the rest of the T x decay cross product and a few more features (one compilation each).
REST = [Case(T, decay, segments=T > 1) for T in (1, 63, 64, 65, 257) for decay in (None, "scalar", "channel")
        if Case(T, decay, segments=T > 1) not in CORE] + [
    Case(65, "channel", initial_state=False),  # neither segments nor initial state
    Case(257, "channel", segments=True, chunk_size=48),  # 3 sub-chunks of 16 per chunk
    Case(65, "channel", segments=True, chunk_size=7),  # odd chunk, does not divide T
    Case(65, None, segments=True, dtype="bfloat16"),
]
# The kernels have their own test file (test_linear_attention_pallas.py); here they run one core
# case by default and the rest of CORE as slow; REST is xla only.
KERNEL_CORE = [CORE[3]]

slow = pytest.mark.slow
MATRIX = ([pytest.param("xla", case, id=f"xla-{case.id}") for case in CORE]
          + [pytest.param(impl, case, id=f"{impl}-{case.id}", marks=() if case in KERNEL_CORE else slow)
             for impl in IMPLEMENTATIONS[1:] for case in CORE]
          + [pytest.param("xla", case, id=f"xla-{case.id}", marks=slow) for case in REST])


@pytest.mark.parametrize("impl,case", MATRIX)
def test_matches_float64_reference(impl, case):
    """A NotImplementedError fails, unless (impl, case) is in REFUSED: then it must be raised."""
    expect_refusal_or_run(REFUSED, impl, case, lambda: assert_matches_reference(impl, case))


def test_reference_matches_numpy_loop():
    """The definition, step by step in numpy float64, on a tiny case with every feature."""
    case = Case(T=9, decay="channel", segments=True, B=2, H=2, K=3, V=4, seed=3)
    x = make_inputs(case)
    x["segment_ids"] = np.array([[0, 0, 0, 1, 1, 2, 2, 2, 2], [5, 5, 5, 5, 5, 5, 5, 5, 5]], np.int32)
    q, k, v, g, s0, seg = (x[n] for n in ("q", "k", "v", "log_decay", "initial_state", "segment_ids"))
    scale = 0.7
    o_want = np.zeros_like(v)
    s_want = np.zeros_like(s0)
    for b in range(case.B):
        for h in range(case.H):
            state = s0[b, h].copy()
            for t in range(case.T):
                if t > 0 and seg[b, t] != seg[b, t - 1]:
                    state = np.zeros_like(state)
                state = np.exp(g[b, t, h])[:, None] * state + np.outer(k[b, t, h], v[b, t, h])
                o_want[b, t, h] = scale * q[b, t, h] @ state
            s_want[b, h] = state
    with jax.enable_x64(True):
        o, s = linear_attention(q, k, v, g, scale=scale, initial_state=s0, segment_ids=seg,
                                return_final_state=True, implementation="reference")
        np.testing.assert_allclose(np.asarray(o), o_want, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.asarray(s), s_want, rtol=1e-12, atol=1e-12)


def _float32(case):
    return float32_inputs(make_inputs(case))


def test_packed_segments_equal_separate_runs():
    """Law: a packed row gives, token for token, what each segment gives run on its own, and the
    final state is that of the last segment run alone."""
    x = _float32(Case(T=40, decay="channel", B=1))
    seg = jnp.asarray(np.repeat([0, 1, 2], [13, 20, 7])[None], jnp.int32)
    run = jax.jit(lambda q, k, v, g, s0, seg: linear_attention(
        q, k, v, g, initial_state=s0, segment_ids=seg, return_final_state=True, chunk_size=8))
    o, s = run(x["q"], x["k"], x["v"], x["log_decay"], x["initial_state"], seg)
    for start, stop in ((0, 13), (13, 33), (33, 40)):
        part = lambda a: a[:, start:stop]
        s0 = x["initial_state"] if start == 0 else jnp.zeros_like(x["initial_state"])
        o_part, s_part = run(part(x["q"]), part(x["k"]), part(x["v"]), part(x["log_decay"]), s0, None)
        np.testing.assert_allclose(o[:, start:stop], o_part, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s, s_part, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("decay", [None, "scalar", "channel"])
def test_xla_chunk_size_invariance(decay):
    """Law: the chunk size changes the order of the sums, not the result (one token per chunk,
    chunks that do not divide T, one chunk longer than T)."""
    x = _float32(Case(T=37, decay=decay, segments=True))
    run = jax.jit(lambda x, chunk_size: linear_attention(
        x["q"], x["k"], x["v"], x["log_decay"], initial_state=x["initial_state"],
        segment_ids=x["segment_ids"], return_final_state=True, chunk_size=chunk_size,
        implementation="xla"), static_argnums=1)
    o_1, s_1 = run(x, 1)
    for chunk_size in (5, 64):
        o, s = run(x, chunk_size)
        np.testing.assert_allclose(o, o_1, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(s, s_1, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("decay", ["channel", pytest.param("scalar", marks=pytest.mark.slow),
                                   pytest.param(None, marks=pytest.mark.slow)])
def test_xla_blocks_match_reference(monkeypatch, decay):
    """Long sequences run in blocks of BLOCK_TOKENS (a scan carrying the state): with blocks of 32
    tokens, a T=100 case crosses blocks, padding and segment starts on block boundaries."""
    monkeypatch.setattr(xla, "BLOCK_TOKENS", 32)
    assert_matches_reference("xla", Case(100, decay, segments=True, chunk_size=16, seed=7))  # starts at 64, 96


@pytest.mark.parametrize("chunk_size", [16, 64])
def test_xla_factored_and_exact_per_channel_scores_agree(chunk_size):
    """Law: xla's two forms of the per-channel intra-chunk scores (factored matmul, exact
    secondary chunking) give the same numbers where both apply (decay span <= 40 per chunk)."""
    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(rng.standard_normal((1, 2, 3, chunk_size, 8)), jnp.float32) for _ in range(2))
    g = jnp.asarray(rng.uniform(-39.0 / chunk_size, 0.0, (1, 2, 3, chunk_size, 8)), jnp.float32)
    factored = xla._per_channel_factored(q, k, g)[0]
    exact = xla._per_channel_scores_exact(q, k, g, xla._sub_chunk(chunk_size))
    np.testing.assert_allclose(factored, exact, rtol=2e-5, atol=2e-5 * float(jnp.max(jnp.abs(exact))))


def test_defaults_jit_and_no_final_state():
    """CPU default is xla; jit == eager; scale defaults to K ** -0.5; no final state unless asked."""
    x = _float32(Case(T=20, decay="scalar"))
    q, k, v, g = x["q"], x["k"], x["v"], x["log_decay"]
    o, none = linear_attention(q, k, v, g)
    assert none is None and o.dtype == v.dtype
    o_xla, _ = linear_attention(q, k, v, g, scale=q.shape[-1] ** -0.5, implementation="xla")
    o_jit, _ = jax.jit(lambda q, k, v, g: linear_attention(q, k, v, g))(q, k, v, g)
    if jax.default_backend() == "cpu":  # elsewhere auto may pick a verified kernel
        np.testing.assert_array_equal(o, o_xla)
    np.testing.assert_allclose(o_jit, o, rtol=1e-6, atol=1e-6)
    o_ref, _ = linear_attention(q, k, v, g, implementation="reference")
    np.testing.assert_allclose(o, o_ref, rtol=1e-5, atol=1e-5)


def _call(B=2, T=5, H=2, K=4, V=3, *, q_shape=None, v_shape=None, **kw):
    q = jnp.zeros(q_shape or (B, T, H, K))
    k = jnp.zeros((B, T, H, K))
    v = jnp.zeros(v_shape or (B, T, H, V))
    return linear_attention(q, k, v, **kw)


@pytest.mark.parametrize("kwargs,message", [
    (dict(q_shape=(2, 5, 8)), r"q, k, v must be \[batch, time, heads, dim\]"),
    (dict(q_shape=(2, 5, 2, 6)), r"q \(2, 5, 2, 6\) and k \(2, 5, 2, 4\) must have the same shape"),
    (dict(v_shape=(2, 4, 2, 3)), r"v \(2, 4, 2, 3\) must match q .* in batch, time and heads"),
    (dict(log_decay=jnp.zeros((2, 5))), r"log_decay shape \(2, 5\) must be \[B, T, H\] = \(2, 5, 2\) "
                                        r"or \[B, T, H, K\] = \(2, 5, 2, 4\)"),
    (dict(log_decay=jnp.full((2, 5, 2), 0.5)), r"log_decay must be <= 0 .*got max 0.5"),
    (dict(initial_state=jnp.zeros((2, 2, 3, 4))), r"initial_state shape \(2, 2, 3, 4\) must be .*\(2, 2, 4, 3\)"),
    (dict(segment_ids=jnp.zeros((2, 4), jnp.int32)), r"segment_ids shape \(2, 4\) must be \[B, T\] = \(2, 5\)"),
    (dict(segment_ids=jnp.zeros((2, 5))), r"segment_ids dtype float32 must be an integer dtype"),
    (dict(chunk_size=0), r"chunk_size=0 must be an integer >= 1"),
    (dict(implementation="triton"), r"implementation='triton' is unknown"),
])
def test_bad_inputs_raise_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        _call(**kwargs)
    assert "\n" not in str(info.value)


def test_positive_log_decay_is_unchecked_under_jit():
    """The value check needs concrete arrays; traced log_decay passes through (documented)."""
    g = jnp.full((2, 5, 2), 0.5)
    o, _ = jax.jit(lambda g: _call(log_decay=g))(g)
    assert o.shape == (2, 5, 2, 3)


@pytest.mark.skipif(jax.default_backend() in ("tpu", "gpu"), reason="the alias resolves on TPU/GPU")
def test_pallas_alias_needs_an_accelerator():
    with pytest.raises(NotImplementedError, match="implementation='pallas' needs a TPU or GPU backend"):
        _call(implementation="pallas")
