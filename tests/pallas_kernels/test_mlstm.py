"""mlstm: the reference against a plain numpy loop; xla and the Pallas kernels (pallas_tpu,
pallas_gpu: interpret mode on a CPU) against the float64 reference (outputs, final state, every
gradient) over odd lengths, packed segments, initial state, gates at their
extremes (li at +-30, lf down to -20, positive lf, exact ties), bfloat16 and two chunk sizes;
laws (packing == separate runs, chunk-size invariance, stabiliser invariance); no inf/NaN at the
extremes; and the one-line input errors."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrax.pallas_kernels.implementation import current_backend
from hybrax.pallas_kernels.mlstm import mlstm, xla
from hybrax.pallas_kernels.verified import is_verified
from kernel_matrix import runs_case
from mlstm_cases import REFUSED, Case, assert_matches_reference, make_inputs, run_op
from reference_checks import relative_error
from refusals import expect_refusal_or_run

IMPLEMENTATIONS = ["xla"] + [
    name for name, module in (("pallas_tpu", "tpu"), ("pallas_gpu", "gpu"))
    if importlib.util.find_spec(f"hybrax.pallas_kernels.mlstm.{module}") is not None]
KERNELS = IMPLEMENTATIONS[1:]

GATES = ("moderate", "extreme", "positive")
# Fast: every feature at least once (each case compiles a forward and backward).
# Positive lf, chunks that do not divide T and blocks: test_xla_blocks_match_reference.
CORE = [
    Case(65, "extreme", segments=True, chunk_size=16),  # li at exactly +-30, lf down to -20
    Case(65, "extreme", segments=True, dtype="bfloat16"),
]
# Slow: the T x gates x chunk cross product and the rest.
REST = [Case(T, gates, segments=T > 1, chunk_size=C) for T in (1, 63, 64, 65, 257) for gates in GATES
        for C in (16, 64)] + [Case(T, gates, segments=True, dtype="bfloat16") for T in (65, 257) for gates in GATES] + [
    # Exact ties everywhere. With segments: a long memory of equal weights makes q . n a random
    # walk whose near-zeros leave h badly conditioned (the float32 reference itself errs by 2e-4).
    Case(65, "tied", segments=True, chunk_size=16),
    Case(64, "tied", segments=True),
    Case(65, "moderate", initial_state=False),  # neither segments nor initial state
    Case(100, "extreme", chunk_size=7),  # odd chunk, no segments
]
REST = [case for case in REST if case not in CORE]

# The kernels (interpret mode here; their own tests: test_mlstm_pallas.py) run one small case with
# every feature by default, and CORE and REST as slow.
KERNEL_CORE = [Case(33, "extreme", segments=True, chunk_size=16, B=1)]

slow = pytest.mark.slow
MATRIX = ([pytest.param("xla", case, id=f"xla-{case.id}") for case in CORE]
          + [pytest.param("xla", case, id=f"xla-{case.id}", marks=slow) for case in REST]
          + [pytest.param(impl, case, id=f"{impl}-{case.id}") for impl in KERNELS for case in KERNEL_CORE]
          + [pytest.param(impl, case, id=f"{impl}-{case.id}", marks=slow) for impl in KERNELS
             for i, case in enumerate(CORE + REST) if runs_case(impl, i, KERNELS)])


# Ill-conditioned for float32 at the kernels' chunk sizes: a token whose denominator nearly cancels
# (h ~ 130) costs the float32 reference scan itself 1.4e-4 on dq, dk and the gate gradients. xla
# with chunks of 7 lands at 2e-5 by luck; the kernels round the chunk up (8 on TPU, 16 on GPU), where
# xla errs by 1.3e-4 too.
KERNEL_TOLERANCE = {Case(100, "extreme", chunk_size=7): 2e-4}


@pytest.mark.parametrize("impl,case", MATRIX)
def test_matches_float64_reference(impl, case):
    """A NotImplementedError fails, unless (impl, case) is in REFUSED: then it must be raised."""
    tolerance = KERNEL_TOLERANCE.get(case) if impl in KERNELS else None
    expect_refusal_or_run(REFUSED, impl, case, lambda: assert_matches_reference(impl, case, tolerance=tolerance))


def test_xla_blocks_match_reference(monkeypatch):
    """Long sequences run in blocks of BLOCK_TOKENS (a scan carrying the state): with blocks of 32
    tokens, a T=100 case crosses blocks, padding and segment starts, with positive lf."""
    monkeypatch.setattr(xla, "BLOCK_TOKENS", 32)
    assert_matches_reference("xla", Case(100, "positive", segments=True, chunk_size=16, seed=7))


def test_xla_newest_max_sends_the_gradient_to_the_newest_tie():
    """At a tie the final m's gradient goes to the newest term, as in the reference's recurrence
    (jnp.max would split it); masked entries get none."""
    x = jnp.asarray([[1.0, 3.0, 3.0, 2.0, 3.0], [1.0, 3.0, 3.0, 2.0, 3.0]])
    valid = jnp.asarray([[True, True, True, True, True], [True, True, True, True, False]])
    value, has_any = xla.newest_max(x, valid)
    np.testing.assert_array_equal(value, [3.0, 3.0])
    assert bool(jnp.all(has_any))
    grad = jax.grad(lambda x: jnp.sum(xla.newest_max(x, valid)[0]))(x)
    np.testing.assert_array_equal(grad, [[0, 0, 0, 0, 1], [0, 0, 1, 0, 0]])


def test_reference_matches_numpy_loop():
    """The definition, step by step in numpy float64, on a tiny case with every feature."""
    case = Case(T=9, gates="positive", segments=True, B=2, H=2, K=3, V=4, seed=3)
    x = make_inputs(case)
    x["segment_ids"] = np.array([[0, 0, 0, 1, 1, 2, 2, 2, 2], [5, 5, 5, 5, 5, 5, 5, 5, 5]], np.int32)
    x["log_input_gate"][0, 4, 0] = 30.0  # a strong input gate dominating its segment
    q, k, v, li, lf, seg = (x[n] for n in ("q", "k", "v", "log_input_gate", "log_forget_gate", "segment_ids"))
    c0, n0, m0 = x["initial_state"]
    scale = 0.7
    h_want = np.zeros_like(v)
    c_want, n_want, m_want = np.zeros_like(c0), np.zeros_like(n0), np.zeros_like(m0)
    for b in range(case.B):
        for hd in range(case.H):
            c, n, m = c0[b, hd].copy(), n0[b, hd].copy(), m0[b, hd]
            for t in range(case.T):
                if t > 0 and seg[b, t] != seg[b, t - 1]:
                    c, n, m = np.zeros_like(c), np.zeros_like(n), 0.0
                m_new = max(lf[b, t, hd] + m, li[b, t, hd])
                f, i = np.exp(lf[b, t, hd] + m - m_new), np.exp(li[b, t, hd] - m_new)
                c = f * c + i * np.outer(k[b, t, hd], v[b, t, hd])
                n = f * n + i * k[b, t, hd]
                m = m_new
                h_want[b, t, hd] = scale * q[b, t, hd] @ c / max(abs(scale * q[b, t, hd] @ n), np.exp(-m))
            c_want[b, hd], n_want[b, hd], m_want[b, hd] = c, n, m
    with jax.enable_x64(True):
        h, (c, n, m) = mlstm(q, k, v, li, lf, scale=scale, initial_state=(c0, n0, m0), segment_ids=seg,
                             return_final_state=True, implementation="reference")
        for got, want in ((h, h_want), (c, c_want), (n, n_want), (m, m_want)):
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)


def _close(got, want, tol=1e-5):
    err = relative_error(got, np.asarray(want, np.float64))
    assert err <= tol, f"relative error {err:.1e} > {tol:.0e}"


def test_packed_segments_equal_separate_runs():
    """Law: a packed row gives, token for token, what each segment gives run on its own (the first
    with the initial state, the others from the zero state), and the final state is that of the
    last segment run alone."""
    x = make_inputs(Case(T=40, gates="positive", B=1))
    x["segment_ids"] = np.repeat([0, 1, 2], [13, 20, 7])[None].astype(np.int32)
    h, state = run_op("xla", x, jnp.float32, chunk_size=8)
    for start, stop in ((0, 13), (13, 33), (33, 40)):
        part = {n: x[n][:, start:stop] for n in ("q", "k", "v", "log_input_gate", "log_forget_gate")}
        part.update(segment_ids=None, initial_state=x["initial_state"] if start == 0 else None)
        h_part, state_part = run_op("xla", part, jnp.float32, chunk_size=8)
        _close(h[:, start:stop], h_part)
    for got, want in zip(state, state_part):
        _close(got, want)


def test_xla_chunk_size_invariance():
    """Law: the chunk size changes the order of the sums, not the result (one token per chunk,
    chunks that do not divide T, one chunk longer than T)."""
    x = make_inputs(Case(T=37, gates="positive", segments=True))
    h_1, state_1 = run_op("xla", x, jnp.float32, chunk_size=1)
    for chunk_size in (5, 64):
        h, state = run_op("xla", x, jnp.float32, chunk_size=chunk_size)
        _close(h, h_1)
        for got, want in zip(state, state_1):
            _close(got, want)


@pytest.mark.parametrize("impl", [pytest.param(impl, marks=slow) for impl in ["reference"] + KERNELS] + ["xla"])
def test_stabiliser_invariance(impl):
    """Law: (C, n, m) and (C e^d, n e^d, m - d) are the same memory (C e^m): the outputs are equal
    and so is the final memory; only the stabiliser may differ."""
    expect_refusal_or_run(REFUSED, impl, "stabiliser_invariance", lambda: _check_stabiliser_invariance(impl))


def _check_stabiliser_invariance(impl):
    x = make_inputs(Case(T=30, gates="moderate", seed=5))
    h, (c, n, m) = run_op(impl, x, jnp.float32, chunk_size=8)
    for d in (6.0, -6.0):
        c0, n0, m0 = x["initial_state"]
        shifted = {**x, "initial_state": (c0 * np.exp(d), n0 * np.exp(d), m0 - d)}
        h_d, (c_d, n_d, m_d) = run_op(impl, shifted, jnp.float32, chunk_size=8)
        _close(h_d, h)
        _close(c_d * np.exp(m_d - m)[..., None, None], c)
        _close(n_d * np.exp(m_d - m)[..., None], n)


EXTREMES = {  # (log_input_gate, log_forget_gate) for [B, T, H]
    "li=+30": lambda rng, s: (np.full(s, 30.0), -np.logaddexp(0.0, -rng.uniform(-20.0, 20.0, s))),
    "li=-30,lf=-20": lambda rng, s: (np.full(s, -30.0), np.full(s, -20.0)),
    "li=+30,lf=0": lambda rng, s: (np.full(s, 30.0), np.zeros(s)),
    "lf=+3": lambda rng, s: (rng.uniform(-30.0, 30.0, s), np.full(s, 3.0)),
}


@pytest.mark.parametrize("impl", [pytest.param(impl, marks=slow) for impl in ["reference"] + KERNELS] + ["xla"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_no_inf_or_nan_at_the_extremes(impl, dtype):
    """Outputs, final state and every gradient stay finite for saturated and positive gates, with
    segments and initial state, in float32 and with bfloat16 inputs (gates included)."""
    expect_refusal_or_run(REFUSED, impl, "extremes", lambda: _check_no_inf_or_nan(impl, dtype))


def _check_no_inf_or_nan(impl, dtype):
    rng = np.random.default_rng(0)
    B, T, H, K, V = 1, 150, 2, 8, 8
    x = make_inputs(Case(T=T, B=B, H=H, K=K, V=V, segments=True, dtype=dtype))
    dt = jnp.dtype(dtype)
    state = tuple(jnp.asarray(a, jnp.float32) for a in x["initial_state"])
    seg = jnp.asarray(x["segment_ids"])

    def loss(q, k, v, li, lf, state):
        h, final = mlstm(q, k, v, li, lf, initial_state=state, segment_ids=seg, return_final_state=True,
                         chunk_size=32, implementation=impl)
        return jnp.sum(h.astype(jnp.float32)) + sum(jnp.sum(s) for s in final), h

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 5), has_aux=True))
    for name, gates in EXTREMES.items():
        li, lf = gates(rng, (B, T, H))
        args = [jnp.asarray(x[n], dt) for n in ("q", "k", "v")] + [jnp.asarray(li, dt), jnp.asarray(lf, dt)]
        (value, h), grads = grad(*args, state)
        for label, a in [("loss", value), ("h", h)] + list(enumerate(jax.tree.leaves(grads))):
            assert np.all(np.isfinite(np.asarray(a, np.float32))), f"{impl} {name}: {label} has inf/NaN"


@pytest.mark.skipif(not is_verified("mlstm", current_backend(), "xla"),
                    reason="mlstm/xla has no row in pallas_kernels/verified.py yet: auto refuses it")
def test_defaults_jit_and_no_final_state():
    """Default is xla; scale defaults to K ** -0.5; no final state unless asked."""
    x = make_inputs(Case(T=20))
    q, k, v, li, lf = (jnp.asarray(x[n], jnp.float32) for n in ("q", "k", "v", "log_input_gate", "log_forget_gate"))
    (h, none), (h_xla, _) = jax.jit(lambda *a: (mlstm(*a), mlstm(*a, scale=a[0].shape[-1] ** -0.5,
                                                                   implementation="xla")))(q, k, v, li, lf)
    assert none is None and h.dtype == v.dtype
    np.testing.assert_array_equal(h, h_xla)


def _call(B=2, T=5, H=2, K=4, V=3, *, q_shape=None, v_shape=None, li=None, lf=None, **kw):
    q = jnp.zeros(q_shape or (B, T, H, K))
    k = jnp.zeros((B, T, H, K))
    v = jnp.zeros(v_shape or (B, T, H, V))
    li = jnp.zeros((B, T, H)) if li is None else li
    lf = jnp.zeros((B, T, H)) if lf is None else lf
    return mlstm(q, k, v, li, lf, **kw)


_STATE = (jnp.zeros((2, 2, 4, 3)), jnp.zeros((2, 2, 4)), jnp.zeros((2, 2)))


@pytest.mark.parametrize("kwargs,message", [
    (dict(q_shape=(2, 5, 8)), r"q, k, v must be \[batch, time, heads, dim\]"),
    (dict(q_shape=(2, 5, 2, 6)), r"q \(2, 5, 2, 6\) and k \(2, 5, 2, 4\) must have the same shape"),
    (dict(v_shape=(2, 4, 2, 3)), r"v \(2, 4, 2, 3\) must match q .* in batch, time and heads"),
    (dict(li=jnp.zeros((2, 5))), r"log_input_gate shape \(2, 5\) must be \[B, T, H\] = \(2, 5, 2\)"),
    (dict(lf=jnp.zeros((2, 5, 2, 4))), r"log_forget_gate shape \(2, 5, 2, 4\) must be \[B, T, H\] = \(2, 5, 2\)"),
    (dict(initial_state=_STATE[0]), r"initial_state must be a tuple \(C, n, m\) of shapes .*; got ArrayImpl"),
    (dict(initial_state=_STATE[:2]), r"initial_state must be a tuple \(C, n, m\)"),
    (dict(initial_state=(_STATE[0], jnp.zeros((2, 2, 3)), _STATE[2])),
     r"initial_state shapes .*\(2, 2, 3\).* must be \(C \[B, H, K, V\], n \[B, H, K\], m \[B, H\]\) = "
     r"\(\(2, 2, 4, 3\), \(2, 2, 4\), \(2, 2\)\)"),
    (dict(segment_ids=jnp.zeros((2, 4), jnp.int32)), r"segment_ids shape \(2, 4\) must be \[B, T\] = \(2, 5\)"),
    (dict(segment_ids=jnp.zeros((2, 5))), r"segment_ids dtype float32 must be an integer dtype"),
    (dict(chunk_size=0), r"chunk_size=0 must be an integer >= 1"),
    (dict(chunk_size=16.0), r"chunk_size=16.0 must be an integer >= 1"),
    (dict(implementation="triton"), r"implementation='triton' is unknown"),
])
def test_bad_inputs_raise_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        _call(**kwargs)
    assert "\n" not in str(info.value)


def test_pallas_alias_needs_an_accelerator():
    with pytest.raises(NotImplementedError, match="implementation='pallas' needs a TPU or GPU backend"):
        _call(implementation="pallas")
