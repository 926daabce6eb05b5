"""slstm: the reference against a plain numpy loop, every implementation against the float64
reference (h, final state (c, n, m, h), the gradients of gate_inputs, R and every part of the
initial state) over odd lengths, packed segments, initial state, input gates at +-30, forget gates
down to -20, larger recurrent weights and bfloat16; laws (packed == separate runs, stabiliser
invariance, causality and an elementwise cell when R = 0); the underflow guard; and the one-line
input errors. The Pallas kernels (pallas_tpu, pallas_gpu; interpret mode on a CPU) run one case
each in the fast suite and the whole matrix and the laws under `slow`; test_slstm_pallas.py has
their own shapes, the TPU-semantics interpreter and the Mosaic / Triton compilation checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrax.pallas_kernels.slstm import api, slstm
from hybrax.pallas_kernels.verified import is_verified
from refusals import expect_refusal_or_run
from slstm_cases import INPUT_GATES, REFUSED, Case, assert_matches_reference, make_inputs
from kernel_matrix import runs_case

IMPLEMENTATIONS = ["xla"]
KERNELS = ["pallas_tpu", "pallas_gpu"]  # interpret mode on a CPU: about 10 s a case (compilation)

# Every length and feature at least once (about 2 s each: one compilation per case).
CORE = [
    Case(1),
    Case(63, initial_state=False),
    Case(64, input_gate="+30"),
    Case(65, input_gate="-30", forget_min=-20.0),
    Case(257, input_gate="uniform30", forget_min=-20.0),
    Case(257, r_scale=3.0),  # large recurrent weights: errors grow along the sequence
    Case(65, dtype="bfloat16", input_gate="uniform30", forget_min=-20.0),
]
# Slow: every length in both dtypes, every gate extreme in both dtypes, and the reference itself
# run in float32 as an implementation (its error is the floor the others are held to).
REST = [c for c in dict.fromkeys(
    [Case(T, dtype=dtype) for T in (1, 63, 64, 65, 257) for dtype in ("float32", "bfloat16")]
    + [Case(257, dtype=dtype, input_gate=gate, forget_min=fmin) for dtype in ("float32", "bfloat16")
       for gate in INPUT_GATES for fmin in (None, -20.0)]
    + [Case(257, segments=False, initial_state=False, input_gate="-30"),  # from zeros: n ~ e^-30
       Case(257, segments=False, initial_state=False, input_gate="uniform30", forget_min=-20.0, seed=1),
       Case(257, r_scale=3.0), Case(257, r_scale=3.0, dtype="bfloat16"),
       Case(64, B=3, H=4, D=32, seed=2), Case(65, B=1, H=1, D=1, seed=3)]) if c not in CORE]
REFERENCE_CASES = [Case(257), Case(257, input_gate="uniform30", forget_min=-20.0), Case(65, r_scale=3.0)]
# The kernels' fast cases (one each; the rest of the matrix is slow): T = 257 is three padded TPU
# time blocks with segments, initial state and extreme gates; bfloat16 for the GPU kernel.
KERNEL_FAST = {"pallas_tpu": CORE[4], "pallas_gpu": CORE[6]}

slow = pytest.mark.slow
MATRIX = ([pytest.param(impl, case, id=f"{impl}-{case.id}") for impl in IMPLEMENTATIONS for case in CORE]
          + [pytest.param(impl, case, id=f"{impl}-{case.id}", marks=slow)
             for impl in IMPLEMENTATIONS for case in REST]
          + [pytest.param(impl, case, id=f"{impl}-{case.id}", marks=[] if case == KERNEL_FAST[impl] else slow)
             for impl in KERNELS for i, case in enumerate(CORE + REST)
             if case == KERNEL_FAST[impl] or runs_case(impl, i, KERNELS)]
          + [pytest.param("reference", case, id=f"reference-{case.id}", marks=slow) for case in REFERENCE_CASES])


@pytest.mark.parametrize("impl,case", MATRIX)
def test_matches_float64_reference(impl, case):
    """A NotImplementedError fails, unless (impl, case) is in REFUSED: then it must be raised."""
    expect_refusal_or_run(REFUSED, impl, case, lambda: assert_matches_reference(impl, case))


def _numpy_slstm(x, R, state, seg):
    """The definition, step by step in numpy float64."""
    B, T, H, _, D = x.shape
    sigmoid = lambda v: 1 / (1 + np.exp(-v))
    h_out = np.zeros((B, T, H, D))
    final = [np.zeros((B, H, D)) for _ in range(4)]
    for b in range(B):
        for hd in range(H):
            c, n, m, h = (s[b, hd].copy() for s in state)
            for t in range(T):
                if t > 0 and seg[b, t] != seg[b, t - 1]:
                    c, n, m, h = (np.zeros(D) for _ in range(4))
                i_pre, f_pre, z_pre, o_pre = (x[b, t, hd, g] + h @ R[hd, :, g] for g in range(4))
                lf = np.log(sigmoid(f_pre))
                m_new = np.maximum(lf + m, i_pre)
                i_gate, f_gate = np.exp(i_pre - m_new), np.exp(lf + m - m_new)
                c = f_gate * c + i_gate * np.tanh(z_pre)
                n = f_gate * n + i_gate
                m = m_new
                h = sigmoid(o_pre) * c / n
                h_out[b, t, hd] = h
            for s, v in zip(final, (c, n, m, h)):
                s[b, hd] = v
    return h_out, final


def test_reference_matches_numpy_loop():
    """The definition, step by step in numpy float64, on a tiny case with every feature."""
    case = Case(T=9, B=2, H=2, D=3, seed=3, input_gate="uniform30")
    x = make_inputs(case)
    seg = np.array([[0, 0, 0, 1, 1, 2, 2, 2, 2], [5, 5, 5, 5, 5, 5, 5, 5, 5]], np.int32)
    h_want, final_want = _numpy_slstm(x["gate_inputs"], x["recurrent_weights"], x["initial_state"], seg)
    with jax.enable_x64(True):
        h, final = slstm(x["gate_inputs"], x["recurrent_weights"], initial_state=x["initial_state"],
                         segment_ids=seg, return_final_state=True, implementation="reference")
        np.testing.assert_allclose(np.asarray(h), h_want, rtol=1e-12, atol=1e-12)
        for got, want in zip(final, final_want):
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)


def _float32(case):
    x = make_inputs(case)
    state = None if x["initial_state"] is None else tuple(jnp.asarray(s, jnp.float32) for s in x["initial_state"])
    seg = None if x["segment_ids"] is None else jnp.asarray(x["segment_ids"])
    return jnp.asarray(x["gate_inputs"], jnp.float32), jnp.asarray(x["recurrent_weights"], jnp.float32), state, seg


LAW_IMPLEMENTATIONS = ["xla", *(pytest.param(impl, marks=slow) for impl in ["reference", *KERNELS])]


@pytest.mark.parametrize("impl", LAW_IMPLEMENTATIONS)
def test_packed_segments_equal_separate_runs(impl):
    """Law: a packed row gives, token for token, what each segment gives run on its own (the first
    from the initial state, the others from zeros); the final state is the last segment's."""
    x, R, state, _ = _float32(Case(T=40, B=1))
    seg = jnp.asarray(np.repeat([0, 1, 2], [13, 20, 7])[None], jnp.int32)
    run = jax.jit(lambda x, s0, seg: slstm(x, R, initial_state=s0, segment_ids=seg, return_final_state=True,
                                           implementation=impl))
    out = expect_refusal_or_run(REFUSED, impl, "packed_segments", lambda: run(x, state, seg))
    if out is None:  # refused on purpose here
        return
    h, final = out
    zeros = tuple(jnp.zeros_like(s) for s in state)
    for start, stop in ((0, 13), (13, 33), (33, 40)):
        h_part, final_part = run(x[:, start:stop], state if start == 0 else zeros, None)
        np.testing.assert_allclose(h[:, start:stop], h_part, rtol=1e-5, atol=1e-6)
    for got, want in zip(final, final_part):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", LAW_IMPLEMENTATIONS)
def test_stabiliser_invariance(impl):
    """Law: m only rescales c and n. Initial states (c, n, m, h) and (c e^d, n e^d, m - d, h) give
    the same outputs h and the same gradients of a loss on h (the backward treats m as a
    stabiliser); the final c / n agrees too."""
    x, R, (c0, n0, m0, h0), seg = _float32(Case(T=50, input_gate="uniform30", forget_min=-20.0))
    d = jnp.asarray(np.random.default_rng(5).uniform(-5.0, 5.0, c0.shape), jnp.float32)
    w = jnp.asarray(np.random.default_rng(6).standard_normal(h0.shape[:1] + x.shape[1:2] + h0.shape[1:]))

    def run(x, R, state):
        h, final = slstm(x, R, initial_state=state, segment_ids=seg, return_final_state=True, implementation=impl)
        return jnp.sum(h * w), (h, final[0] / final[1])

    grad = jax.jit(jax.grad(run, argnums=(0, 1), has_aux=True))
    out = expect_refusal_or_run(REFUSED, impl, "stabiliser", lambda: grad(x, R, (c0, n0, m0, h0)))
    if out is None:  # refused on purpose here
        return
    (dx, dR), (h, ratio) = out
    (dx_d, dR_d), (h_d, ratio_d) = grad(x, R, (c0 * jnp.exp(d), n0 * jnp.exp(d), m0 - d, h0))
    for got, want in ((h_d, h), (ratio_d, ratio), (dx_d, dx), (dR_d, dR)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("zero_recurrence", [True, pytest.param(False, marks=slow)])
def test_causal_by_gradient(zero_recurrence):
    """Law: d h_t / d gate_inputs_s = 0 for s > t (rows of the jacobian by xla's backward), and with
    R = 0 the cell is elementwise: h[b, t, h, d] depends only on gate_inputs[b, :t+1, h, :, d]. Rows
    and heads (block-diagonal R) never mix. The rows also match the reference's (autodiff)."""
    x, R, state, _ = _float32(Case(T=6, B=2, H=2, D=3, segments=False, seed=4))
    if zero_recurrence:
        R = jnp.zeros_like(R)
    rows = {}
    for impl in ("xla", "reference"):
        _, vjp = jax.vjp(lambda x: slstm(x, R, initial_state=state, implementation=impl)[0], x)
        row = jax.jit(lambda ct: vjp(ct)[0])
        rows[impl] = [np.asarray(row(jnp.zeros(x.shape[:3] + x.shape[4:]).at[at].set(1.0)))
                      for at in ((0, 3, 1, 2), (1, 0, 0, 0), (1, 5, 1, 1))]
    for (b, t, hd, d), J, J_ref in zip(((0, 3, 1, 2), (1, 0, 0, 0), (1, 5, 1, 1)), rows["xla"], rows["reference"]):
        np.testing.assert_allclose(J, J_ref, rtol=1e-5, atol=1e-6)
        allowed = np.zeros(J.shape, bool)  # [b', s, h', g, d']
        allowed[b, :t + 1, hd] = True
        if zero_recurrence:
            allowed[:, :, :, :, np.arange(J.shape[-1]) != d] = False
        assert np.all(J[~allowed] == 0), f"h[{b}, {t}, {hd}, {d}] depends on gate inputs it must not"
        assert np.all(J[b, t, hd, :, d] != 0), "h_t depends on its own four gate inputs"


def test_underflow_guard():
    """From a zero state an input gate below about -87 (float32) makes exp(i~ - m) underflow: n = c
    = 0, and the guarded division gives h = 0 with a finite, zero gradient through it; later
    steps are unaffected. xla's values and gradients match the float32 reference's."""
    x, R, _, _ = _float32(Case(T=5, segments=False, initial_state=False))
    x = x.at[:, 0, :, 0].set(-100.0)

    def loss(x, R, impl):
        h, final = slstm(x, R, return_final_state=True, implementation=impl)
        return jnp.sum(h) + sum(jnp.sum(s) for s in final), h

    grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)
    got, want = grad(x, R, "xla"), grad(x, R, "reference")
    for (dx, dR), h in (got, want):
        assert np.all(np.asarray(h[:, 0]) == 0)
        assert np.all(np.isfinite(h)) and np.all(np.isfinite(dx)) and np.all(np.isfinite(dR))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_defaults_jit_and_no_final_state():
    """Default order: the Pallas kernel of the accelerator, then xla (auto keeps only what verified.py
    lists: the kernels are not there); jit == eager; no final state unless asked."""
    assert api.DEFAULTS == {"tpu": ("pallas_tpu", "xla"), "gpu": ("pallas_gpu", "xla"), "default": ("xla",)}
    for backend in ("tpu", "gpu"):
        assert not is_verified("slstm", backend, f"pallas_{backend}")
    x, R, state, seg = _float32(Case(T=20))
    h, none = slstm(x, R, initial_state=state, segment_ids=seg, implementation="xla")
    assert none is None and h.dtype == x.dtype and h.shape == x.shape[:3] + x.shape[4:]
    h_jit, _ = jax.jit(lambda x: slstm(x, R, initial_state=state, segment_ids=seg, implementation="xla"))(x)
    np.testing.assert_allclose(h_jit, h, rtol=1e-6, atol=1e-6)
    h_ref, _ = slstm(x, R, initial_state=state, segment_ids=seg, implementation="reference")
    np.testing.assert_allclose(h, h_ref, rtol=1e-5, atol=1e-6)  # the forward without gradients
    if is_verified("slstm", "cpu", "xla"):
        np.testing.assert_array_equal(slstm(x, R, initial_state=state, segment_ids=seg)[0], h)
    else:  # until the lead adds the "*" row for xla
        with pytest.raises(NotImplementedError, match="slstm: no implementation is verified"):
            slstm(x, R)


def _call(B=2, T=5, H=2, D=3, *, x_shape=None, r_shape=None, x_dtype=jnp.float32, **kw):
    x = jnp.zeros(x_shape or (B, T, H, 4, D), x_dtype)
    R = jnp.zeros(r_shape or (H, D, 4, D))
    return slstm(x, R, **{"implementation": "xla", **kw})


STATE = tuple(jnp.zeros((2, 2, 3)) for _ in range(4))


@pytest.mark.parametrize("kwargs,message", [
    (dict(x_shape=(2, 5, 2, 12)), r"gate_inputs must be \[batch, time, heads, 4, dim\] .*got shape \(2, 5, 2, 12\)"),
    (dict(x_shape=(2, 5, 2, 3, 3)), r"gate_inputs must be .*got shape \(2, 5, 2, 3, 3\)"),
    (dict(x_dtype=jnp.int32), r"gate_inputs dtype int32 must be a floating dtype"),
    (dict(r_shape=(2, 3, 3, 4)), r"recurrent_weights shape \(2, 3, 3, 4\) must be \[H, D, 4, D\] = \(2, 3, 4, 3\)"),
    (dict(initial_state=STATE[:3]), r"initial_state must be a tuple \(c, n, m, h\) of 4 arrays .*got a tuple of 3"),
    (dict(initial_state=jnp.zeros((2, 2, 3))), r"initial_state must be a tuple .*got ArrayImpl"),
    (dict(initial_state=STATE[:2] + (jnp.zeros((2, 3)),) + STATE[3:]),
     r"initial_state m shape \(2, 3\) must be \[B, H, D\] = \(2, 2, 3\)"),
    (dict(segment_ids=jnp.zeros((2, 4), jnp.int32)), r"segment_ids shape \(2, 4\) must be \[B, T\] = \(2, 5\)"),
    (dict(segment_ids=jnp.zeros((2, 5))), r"segment_ids dtype float32 must be an integer dtype"),
    (dict(implementation="triton"), r"implementation='triton' is unknown"),
])
def test_bad_inputs_raise_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        _call(**kwargs)
    assert "\n" not in str(info.value)
