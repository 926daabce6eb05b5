"""delta_rule: the reference against a plain numpy loop, every implementation against the float64
reference (outputs, final state, all gradients) over odd lengths, with and without decay, packed
segments, initial state, beta at exactly 0 and 1, strong gates, bfloat16 and chunk sizes that do
and do not divide T; laws (packing == separate runs, chunk-size invariance, beta = 0 keeps the
decayed initial state, beta = 1 writes a key's value exactly); and the one-line input errors."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from delta_rule_cases import REFUSED, Case, assert_matches_reference, make_inputs
from kernel_matrix import runs_case
from hybrax.pallas_kernels.delta_rule import api, delta_rule, xla
from hybrax.pallas_kernels.implementation import current_backend, kernel_policy
from hybrax.pallas_kernels.verified import is_verified
from reference_checks import float32_inputs
from refusals import expect_refusal_or_run

KERNELS = [name for name, module in (("pallas_tpu", "tpu"), ("pallas_gpu", "gpu"))
           if importlib.util.find_spec(f"hybrax.pallas_kernels.delta_rule.{module}") is not None]

# Every length, decay form and feature at least once (xla runs all of these by default).
CORE = [
    Case(1),
    Case(65, segments=True),  # one full chunk of 64 and one padded
    Case(257, decay=False, segments=True),  # chunk of 64 does not divide T
    Case(64, segments=True, chunk_size=16, beta="mixed", decay_min=-20.0),  # extremes, chunk divides T
    Case(65, segments=True, beta="mixed", decay_min=-20.0, dtype="bfloat16"),
]
# Slow: the rest of the T x decay cross product, beta extremes, bfloat16 and odd chunks.
REST = [Case(T, decay, segments=T > 1) for T in (1, 63, 64, 65, 257) for decay in (False, True)
        if Case(T, decay, segments=T > 1) not in CORE] + [
    *[Case(65, segments=True, beta=beta, chunk_size=C) for beta in ("zero", "one", "mixed") for C in (16, 64)],
    Case(64, decay=False, beta="one"),  # plain DeltaNet with full writes: the largest (I + A)^-1
    Case(256, decay=False, beta="one", B=1, K=64, V=64),  # the same at a layer's head size
    Case(257, segments=True, decay_min=-20.0, chunk_size=16),
    Case(65, initial_state=False),  # neither segments nor initial state
    Case(65, segments=True, chunk_size=7),  # odd chunk, does not divide T (inverse padded to 8)
    Case(63, segments=True, chunk_size=48),  # chunk not a power of two, longer than half of T
    Case(63, decay=False, segments=True, dtype="bfloat16"),
    Case(257, segments=True, dtype="bfloat16"),
    Case(64, beta="one", decay_min=-20.0, dtype="bfloat16"),
    Case(64, beta="zero", dtype="bfloat16"),
]
# The reference against itself in float32: one core case by default, the rest slow. The kernels
# (interpret mode on a CPU; test_delta_rule_pallas.py has their own checks) run one core case each
# by default (segments, decay, initial state, a padded chunk; and bfloat16 for the TPU kernel) and
# the whole matrix as slow.
slow = pytest.mark.slow
KERNEL_CORE = {"pallas_tpu": [CORE[1]], "pallas_gpu": [CORE[1]]}
MATRIX = ([pytest.param("xla", case, id=f"xla-{case.id}") for case in CORE]
          + [pytest.param("reference", case, id=f"reference-{case.id}", marks=() if case is CORE[1] else slow)
             for case in CORE]
          + [pytest.param("xla", case, id=f"xla-{case.id}", marks=slow) for case in REST]
          + [pytest.param(impl, case, id=f"{impl}-{case.id}",
                          marks=() if case in KERNEL_CORE.get(impl, ()) else slow)
             for impl in KERNELS for i, case in enumerate(CORE + REST)
             if case in KERNEL_CORE.get(impl, ()) or runs_case(impl, i, KERNELS)])


@pytest.mark.parametrize("impl,case", MATRIX)
def test_matches_float64_reference(impl, case):
    """A NotImplementedError fails, unless (impl, case) is in REFUSED: then it must be raised."""
    expect_refusal_or_run(REFUSED, impl, case, lambda: assert_matches_reference(impl, case))


@pytest.mark.parametrize("case", [Case(100, segments=True, chunk_size=16, beta="mixed", decay_min=-20.0, seed=7),
                                  pytest.param(Case(100, decay=False, segments=True, chunk_size=16, seed=7),
                                               marks=slow)], ids=lambda case: case.id)
def test_xla_blocks_match_reference(monkeypatch, case):
    """Long sequences run in blocks of BLOCK_TOKENS (a scan carrying the state): with blocks of 32
    tokens, a T=100 case crosses blocks, padding and segment starts on block boundaries."""
    monkeypatch.setattr(xla, "BLOCK_TOKENS", 32)
    assert_matches_reference("xla", case)


def test_reference_matches_numpy_loop():
    """The definition, step by step in numpy float64, on a tiny case with every feature."""
    case = Case(T=9, segments=True, B=2, H=2, K=3, V=4, seed=3)
    x = make_inputs(case)
    x["segment_ids"] = np.array([[0, 0, 0, 1, 1, 2, 2, 2, 2], [5, 5, 5, 5, 5, 5, 5, 5, 5]], np.int32)
    q, k, v, beta, g, s0, seg = (x[n] for n in ("q", "k", "v", "beta", "log_decay", "initial_state", "segment_ids"))
    scale = 0.7
    o_want = np.zeros_like(v)
    s_want = np.zeros_like(s0)
    for b in range(case.B):
        for h in range(case.H):
            state = s0[b, h].copy()
            for t in range(case.T):
                if t > 0 and seg[b, t] != seg[b, t - 1]:
                    state = np.zeros_like(state)
                kt = k[b, t, h][:, None]  # column [K, 1]
                transition = np.exp(g[b, t, h]) * (np.eye(case.K) - beta[b, t, h] * kt @ kt.T)
                state = transition @ state + beta[b, t, h] * kt @ v[b, t, h][None, :]
                o_want[b, t, h] = scale * q[b, t, h] @ state
            s_want[b, h] = state
    with jax.enable_x64(True):
        o, s = delta_rule(q, k, v, beta, g, scale=scale, initial_state=s0, segment_ids=seg,
                          return_final_state=True, implementation="reference")
        np.testing.assert_allclose(np.asarray(o), o_want, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.asarray(s), s_want, rtol=1e-12, atol=1e-12)


def _float32(case):
    return float32_inputs(make_inputs(case))


def test_packed_segments_equal_separate_runs():
    """Law: a packed row gives, token for token, what each segment gives run on its own, and the
    final state is that of the last segment run alone."""
    x = _float32(Case(T=40, B=1))
    seg = jnp.asarray(np.repeat([0, 1, 2], [13, 20, 7])[None], jnp.int32)
    run = jax.jit(lambda q, k, v, beta, g, s0, seg: delta_rule(
        q, k, v, beta, g, initial_state=s0, segment_ids=seg, return_final_state=True, chunk_size=8,
        implementation="xla"))
    o, s = run(x["q"], x["k"], x["v"], x["beta"], x["log_decay"], x["initial_state"], seg)
    for start, stop in ((0, 13), (13, 33), (33, 40)):
        part = lambda a: a[:, start:stop]
        s0 = x["initial_state"] if start == 0 else jnp.zeros_like(x["initial_state"])
        o_part, s_part = run(part(x["q"]), part(x["k"]), part(x["v"]), part(x["beta"]), part(x["log_decay"]),
                             s0, None)
        np.testing.assert_allclose(o[:, start:stop], o_part, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s, s_part, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("decay", [True, pytest.param(False, marks=slow)])
def test_xla_chunk_size_invariance(decay):
    """Law: the chunk size changes the order of the sums, not the result (one token per chunk,
    chunks that do not divide T, one chunk longer than T)."""
    x = _float32(Case(T=37, decay=decay, segments=True, beta="mixed"))
    run = jax.jit(lambda x, chunk_size: delta_rule(
        x["q"], x["k"], x["v"], x["beta"], x["log_decay"], initial_state=x["initial_state"],
        segment_ids=x["segment_ids"], return_final_state=True, chunk_size=chunk_size,
        implementation="xla"), static_argnums=1)
    o_1, s_1 = run(x, 1)
    for chunk_size in (5, 64):
        o, s = run(x, chunk_size)
        np.testing.assert_allclose(o, o_1, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(s, s_1, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_beta_zero_keeps_the_decayed_initial_state(impl):
    """Law: with beta = 0 nothing is written: S_t = exp(g_1 + .. + g_t) S_0 and
    o_t = scale q_t exp(g_1 + .. + g_t) S_0, whatever k and v are."""
    x = _float32(Case(T=50, beta="zero"))
    scale = 0.5
    o, s = jax.jit(lambda x: delta_rule(
        x["q"], x["k"], x["v"], x["beta"], x["log_decay"], scale=scale, initial_state=x["initial_state"],
        return_final_state=True, chunk_size=16, implementation=impl))(x)
    decay_BxTxH = np.exp(np.cumsum(np.asarray(x["log_decay"], np.float64), axis=1))
    o_want = scale * np.einsum("bthk,bth,bhkv->bthv", np.asarray(x["q"]), decay_BxTxH,
                               np.asarray(x["initial_state"]))
    s_want = decay_BxTxH[:, -1, :, None, None] * np.asarray(x["initial_state"])
    np.testing.assert_allclose(o, o_want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s, s_want, rtol=1e-5, atol=1e-30)


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_beta_one_reads_back_the_value_just_written(impl):
    """Law: with beta = 1, a unit key and no decay, the step overwrites what the memory returns for
    k_t: S_t^T k_t = v_t (I - k k^T projects out the old answer). With q = k and scale 1 the
    output is therefore v, whatever the initial state."""
    x = _float32(Case(T=40, decay=False, beta="one"))
    o, _ = jax.jit(lambda x: delta_rule(x["k"], x["k"], x["v"], x["beta"], scale=1.0,
                                        initial_state=x["initial_state"], chunk_size=16, implementation=impl))(x)
    np.testing.assert_allclose(o, x["v"], rtol=1e-4, atol=1e-5)


def test_defaults_and_no_final_state():
    """Default order: the backend's kernel then xla on TPU / GPU, xla on the CPU (auto keeps only the
    verified ones); scale defaults to K ** -0.5; no final state unless asked."""
    assert api.DEFAULTS == {"tpu": ("pallas_tpu", "xla"), "gpu": ("pallas_gpu", "xla"), "default": ("xla",)}
    x = _float32(Case(T=20))
    args = (x["q"], x["k"], x["v"], x["beta"], x["log_decay"])
    run = jax.jit(lambda *a, **kw: delta_rule(*a, **kw), static_argnames=("scale", "implementation"))
    o, none = run(*args, implementation="xla")
    assert none is None and o.dtype == x["v"].dtype
    o_scaled, _ = run(*args, scale=x["q"].shape[-1] ** -0.5, implementation="xla")
    np.testing.assert_array_equal(o, o_scaled)
    o_ref, _ = run(*args, implementation="reference")
    np.testing.assert_allclose(o, o_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not is_verified("delta_rule", current_backend(), "xla"),
                    reason="delta_rule has no verified.py row yet")
def test_auto_runs_xla():
    x = _float32(Case(T=20))
    args = (x["q"], x["k"], x["v"], x["beta"], x["log_decay"])
    with kernel_policy() as choices:
        o = jax.jit(lambda *a: delta_rule(*a)[0])(*args)
    assert choices.ran("delta_rule") == {"xla"}, choices.report()
    np.testing.assert_array_equal(o, jax.jit(lambda *a: delta_rule(*a, implementation="xla")[0])(*args))


def _call(B=2, T=5, H=2, K=4, V=3, *, q_shape=None, v_shape=None, beta_shape=None, **kw):
    q = jnp.zeros(q_shape or (B, T, H, K))
    k = jnp.zeros((B, T, H, K))
    v = jnp.zeros(v_shape or (B, T, H, V))
    beta = jnp.zeros(beta_shape or (B, T, H))
    return delta_rule(q, k, v, beta, implementation=kw.pop("implementation", "xla"), **kw)


@pytest.mark.parametrize("kwargs,message", [
    (dict(q_shape=(2, 5, 8)), r"q, k, v must be \[batch, time, heads, dim\]"),
    (dict(q_shape=(2, 5, 2, 6)), r"q \(2, 5, 2, 6\) and k \(2, 5, 2, 4\) must have the same shape"),
    (dict(v_shape=(2, 4, 2, 3)), r"v \(2, 4, 2, 3\) must match q .* in batch, time and heads"),
    (dict(beta_shape=(2, 5, 2, 1)), r"beta shape \(2, 5, 2, 1\) must be \[B, T, H\] = \(2, 5, 2\)"),
    (dict(log_decay=jnp.zeros((2, 5))), r"log_decay shape \(2, 5\) must be \[B, T, H\] = \(2, 5, 2\)"),
    (dict(log_decay=jnp.zeros((2, 5, 2, 4))), r"log_decay shape \(2, 5, 2, 4\) must be \[B, T, H\]"),
    (dict(log_decay=jnp.full((2, 5, 2), 0.5)), r"log_decay must be <= 0 .*got max 0.5"),
    (dict(initial_state=jnp.zeros((2, 2, 3, 4))), r"initial_state shape \(2, 2, 3, 4\) must be .*\(2, 2, 4, 3\)"),
    (dict(segment_ids=jnp.zeros((2, 4), jnp.int32)), r"segment_ids shape \(2, 4\) must be \[B, T\] = \(2, 5\)"),
    (dict(segment_ids=jnp.zeros((2, 5))), r"segment_ids dtype float32 must be an integer dtype"),
    (dict(chunk_size=0), r"chunk_size=0 must be an integer >= 1"),
    (dict(chunk_size=16.0), r"chunk_size=16.0 must be an integer >= 1"),
    (dict(implementation="cudnn"), r"implementation='cudnn' is unknown"),
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
