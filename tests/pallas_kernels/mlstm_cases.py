"""Shared inputs and assertions for every implementation of `mlstm`.

A `Case` names one input configuration; `assert_matches_reference(impl, case)` runs the op with
`implementation=impl` and checks the output h, the final state (C, n, m) and the gradients of q, k,
v, log_input_gate, log_forget_gate and the initial state (C_0, n_0, m_0) of a fixed random linear
functional of output and final state against the reference run in float64 on the same inputs
(rounded to the case's dtype first, so only the implementation's own error is measured).

Error measure: ||got - want|| / ||want|| over the whole array (Frobenius norms), per array.
Tolerances: float32 inputs 1e-4; bfloat16 inputs 2e-2 (h is rounded to bfloat16, unit roundoff
2^-9 ~ 2e-3, and a kernel may feed its matmuls bfloat16 operands: about ten roundoffs, an order of
magnitude below what a wrong mask, gate or segment rule produces).

Gates: "moderate" (li uniform in [-4, 4], lf = log_sigmoid of pre-activations in [-2, 6]),
"extreme" (li uniform in [-30, 30] with an eighth of the tokens at exactly +30 and an eighth at
exactly -30, lf = log_sigmoid of pre-activations in [-20, 20], so down to -20 and up to -2e-9) and
"positive" (lf uniform in [-1.5, 1]: an exponential forget gate, partly > 0) and "tied" (li = 30,
lf = 0 everywhere: every term of the max ties, and the gradient of the final m must go to the
newest term, as in the reference).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from hybrax.pallas_kernels.mlstm import mlstm
from reference_checks import assert_close, float64_outputs, packed_segment_ids
from refusals import ON_THE_OTHER_ACCELERATOR

FLOAT32_TOLERANCE = 1e-4
BFLOAT16_TOLERANCE = 2e-2
GRAD_NAMES = ("q", "k", "v", "log_input_gate", "log_forget_gate", "initial_state")
STATE_NAMES = ("C", "n", "m")

# Refusals on purpose (refusals.py): any other NotImplementedError on these cases is a failure.
# Only the kernel of the other accelerator: on a CPU both kernels interpret every case.
REFUSED = [*ON_THE_OTHER_ACCELERATOR]


@dataclasses.dataclass(frozen=True)
class Case:
    """One input configuration; segments: packed segment_ids with a few segments per row (ids
    need not increase, only changes count)."""
    T: int
    gates: str = "moderate"
    segments: bool = False
    initial_state: bool = True
    chunk_size: int = 64
    dtype: str = "float32"
    B: int = 2
    H: int = 2
    K: int = 8
    V: int = 16
    seed: int = 0

    @property
    def id(self) -> str:
        parts = [f"T{self.T}", self.gates, f"C{self.chunk_size}", self.dtype]
        return "-".join(parts + ["segments"] * self.segments + ["init"] * self.initial_state)

    @property
    def tolerance(self) -> float:
        return BFLOAT16_TOLERANCE if self.dtype == "bfloat16" else FLOAT32_TOLERANCE


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def make_gates(gates: str, rng, shape):
    """(log_input_gate, log_forget_gate) float64 arrays rounded to float32."""
    if gates == "moderate":
        li, lf = rng.uniform(-4.0, 4.0, shape), log_sigmoid(rng.uniform(-2.0, 6.0, shape))
    elif gates == "extreme":
        li = rng.uniform(-30.0, 30.0, shape)
        pick = rng.random(shape)
        li = np.where(pick < 0.125, 30.0, np.where(pick > 0.875, -30.0, li))
        lf = log_sigmoid(rng.uniform(-20.0, 20.0, shape))
    elif gates == "positive":
        li, lf = rng.uniform(-4.0, 4.0, shape), rng.uniform(-1.5, 1.0, shape)
    elif gates == "tied":
        li, lf = np.full(shape, 30.0), np.zeros(shape)
    else:
        raise ValueError(f"gates={gates!r}")
    to32 = lambda x: np.asarray(x, np.float32).astype(np.float64)
    return to32(li), to32(lf)


def make_inputs(case: Case) -> dict:
    """Float64 numpy inputs (q, k, v already rounded to the case's dtype, the rest to float32)
    and int32 segment ids."""
    rng = np.random.default_rng(case.seed)
    B, T, H, K, V = case.B, case.T, case.H, case.K, case.V
    round_to = lambda x: np.asarray(jnp.asarray(x, case.dtype).astype(jnp.float32), np.float64)
    to32 = lambda x: np.asarray(x, np.float32).astype(np.float64)
    inputs = {
        "q": round_to(rng.standard_normal((B, T, H, K))),
        "k": round_to(rng.standard_normal((B, T, H, K))),
        "v": round_to(rng.standard_normal((B, T, H, V))),
        "initial_state": None,
        "segment_ids": None,
    }
    inputs["log_input_gate"], inputs["log_forget_gate"] = make_gates(case.gates, rng, (B, T, H))
    if case.initial_state:
        inputs["initial_state"] = (to32(rng.standard_normal((B, H, K, V))), to32(rng.standard_normal((B, H, K))),
                                   to32(rng.uniform(-3.0, 3.0, (B, H))))
    if case.segments:  # about four segments per row; ids reused after a change
        inputs["segment_ids"] = packed_segment_ids(rng, B, T)
    return inputs


def _cotangents(case: Case):
    rng = np.random.default_rng(1000 + case.seed)
    B, T, H, K, V = case.B, case.T, case.H, case.K, case.V
    return (rng.standard_normal((B, T, H, V)),
            (rng.standard_normal((B, H, K, V)), rng.standard_normal((B, H, K)), rng.standard_normal((B, H))))


def run_op(impl: str, inputs: dict, dtype, *, chunk_size: int = 64):
    """jitted (h, final_state) on `inputs` (q, k, v cast to dtype; gates and state float32, or
    float64 when dtype is)."""
    return _jitted_op(impl, jnp.dtype(dtype), chunk_size)(inputs)


@functools.lru_cache(maxsize=None)
def _jitted_op(impl: str, dtype, chunk_size: int):  # one jit per configuration: calls reuse its cache
    gate_dtype = jnp.float64 if dtype == jnp.float64 else jnp.float32
    return jax.jit(lambda x: mlstm(*_args(x, dtype, gate_dtype), initial_state=_state(x, gate_dtype),
                                   segment_ids=_segments(x), return_final_state=True,
                                   chunk_size=chunk_size, implementation=impl))


def _args(x, dtype, gate_dtype):
    return tuple(jnp.asarray(x[n], dt) for n, dt in (("q", dtype), ("k", dtype), ("v", dtype),
                                                      ("log_input_gate", gate_dtype), ("log_forget_gate", gate_dtype)))


def _state(x, gate_dtype):
    return None if x["initial_state"] is None else tuple(jnp.asarray(a, gate_dtype) for a in x["initial_state"])


def _segments(x):
    return None if x["segment_ids"] is None else jnp.asarray(x["segment_ids"])


def outputs_and_grads(impl: str, case: Case, inputs: dict, dtype) -> dict:
    """{h, C, n, m, d<name>...} for `impl` (initial-state gradients as dC0, dn0, dm0). Runs under jit."""
    w_h, w_state = _cotangents(case)
    gate_dtype = jnp.float64 if dtype == jnp.float64 else jnp.float32
    q, k, v, li, lf = _args(inputs, dtype, gate_dtype)
    diff = {"q": q, "k": k, "v": v, "log_input_gate": li, "log_forget_gate": lf}
    if inputs["initial_state"] is not None:
        diff["initial_state"] = _state(inputs, gate_dtype)
    seg = _segments(inputs)

    def run(d):
        return mlstm(d["q"], d["k"], d["v"], d["log_input_gate"], d["log_forget_gate"],
                     initial_state=d.get("initial_state"), segment_ids=seg, return_final_state=True,
                     chunk_size=case.chunk_size, implementation=impl)

    def loss(d):
        h, state = run(d)
        total = jnp.sum(h.astype(gate_dtype) * jnp.asarray(w_h, gate_dtype))
        return total + sum(jnp.sum(s.astype(gate_dtype) * jnp.asarray(w, gate_dtype)) for s, w in zip(state, w_state))

    (h, state), grads = jax.jit(lambda d: (run(d), jax.grad(loss)(d)))(diff)
    out = {"h": h, **dict(zip(STATE_NAMES, state))}
    out.update({f"d{name}": grads[name] for name in grads if name != "initial_state"})
    if "initial_state" in grads:
        out.update({f"d{name}0": g for name, g in zip(STATE_NAMES, grads["initial_state"])})
    return out


@functools.lru_cache(maxsize=None)
def reference_float64(case: Case) -> dict:
    """The reference scan in float64 on the case's inputs: the ground truth, cached per case."""
    return float64_outputs(outputs_and_grads, case, make_inputs(case))


def assert_matches_reference(impl: str, case: Case, *, tolerance: float | None = None) -> dict:
    """Assert that `impl` matches the float64 reference on `case`: finite values, dtypes of the
    contract (h in the input dtype, final state float32) and relative errors <= tolerance (the
    case's default unless given). Returns the errors."""
    tolerance = case.tolerance if tolerance is None else tolerance
    got = outputs_and_grads(impl, case, make_inputs(case), jnp.dtype(case.dtype))
    want = reference_float64(case)
    return assert_close(impl, case, got, want, tolerance=tolerance, output="h", states=STATE_NAMES)
