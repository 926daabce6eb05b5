"""Shared inputs and assertions for every implementation of `delta_rule`.

A `Case` names one input configuration; `assert_matches_reference(impl, case)` runs the op with
`implementation=impl` and checks the output, the final state and the gradients of q, k, v, beta,
log_decay and initial_state (of a fixed random linear functional of output and final state)
against the reference run in float64 on the same inputs (rounded to the case's dtype first, so
only the implementation's own error is measured). q and k are L2-normalised per head, as the
layer does, so with beta in [0, 1] every step's transition is contractive.

Error measure: ||got - want|| / ||want|| over the whole array (Frobenius norms), per array.
Tolerances: float32 inputs 1e-4. bfloat16 inputs 2e-2: the output and the gradients of q, k, v
and beta are rounded to bfloat16 (unit roundoff 2^-9 ~ 2e-3), and a kernel may feed its matmuls
bfloat16 operands, which on random data costs a few more roundoffs; 2e-2 is about ten
roundoffs, an order of magnitude below what a wrong mask, decay, segment or delta rule produces
(errors of order 1).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from hybrax.pallas_kernels.delta_rule import delta_rule
from reference_checks import assert_close, float64_outputs, packed_segment_ids
from refusals import ON_THE_OTHER_ACCELERATOR

FLOAT32_TOLERANCE = 1e-4
BFLOAT16_TOLERANCE = 2e-2
GRAD_NAMES = ("q", "k", "v", "beta", "log_decay", "initial_state")
BETAS = ("uniform", "zero", "one", "mixed")

# Refusals on purpose (refusals.py): any other NotImplementedError on these cases is a failure.
# Only the kernel of the other accelerator: on a CPU both kernels interpret every case.
REFUSED = [*ON_THE_OTHER_ACCELERATOR]


@dataclasses.dataclass(frozen=True)
class Case:
    """One input configuration. decay: log_decay [B, T, H] uniform in [decay_min, 0], or None.
    beta: "uniform" in [0, 1], exactly "zero" or "one" everywhere, or "mixed" (each token 0, 1 or
    uniform). segments: packed segment_ids with a few segments per row (ids need not increase,
    only changes count)."""
    T: int
    decay: bool = True
    segments: bool = False
    initial_state: bool = True
    beta: str = "uniform"
    chunk_size: int = 64
    dtype: str = "float32"
    decay_min: float = -2.0
    B: int = 2
    H: int = 2
    K: int = 8
    V: int = 16
    seed: int = 0

    @property
    def id(self) -> str:
        parts = [f"T{self.T}", "decay" if self.decay else "nodecay", f"C{self.chunk_size}", self.dtype]
        parts += ["segments"] * self.segments + ["init"] * self.initial_state
        parts += [f"beta={self.beta}"] * (self.beta != "uniform")
        parts += [f"gmin={self.decay_min:g}"] * (self.decay_min != -2.0)
        parts += [f"K{self.K}V{self.V}"] * ((self.K, self.V) != (8, 16))
        return "-".join(parts)

    @property
    def tolerance(self) -> float:
        return BFLOAT16_TOLERANCE if self.dtype == "bfloat16" else FLOAT32_TOLERANCE


def make_inputs(case: Case) -> dict:
    """Float64 numpy inputs (already rounded to the case's dtype) and int32 segment ids."""
    assert case.beta in BETAS, case.beta
    rng = np.random.default_rng(case.seed)
    B, T, H, K, V = case.B, case.T, case.H, case.K, case.V
    round_to = lambda x: np.asarray(jnp.asarray(x, case.dtype).astype(jnp.float32), np.float64)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # L2-normalised per head, as the layer
    beta = rng.uniform(0.0, 1.0, (B, T, H))
    if case.beta in ("zero", "one"):
        beta = np.full((B, T, H), float(case.beta == "one"))
    elif case.beta == "mixed":
        beta = np.choose(rng.integers(0, 3, (B, T, H)), [np.zeros_like(beta), np.ones_like(beta), beta])
    inputs = {
        "q": round_to(unit(rng.standard_normal((B, T, H, K)))),
        "k": round_to(unit(rng.standard_normal((B, T, H, K)))),
        "v": round_to(rng.standard_normal((B, T, H, V))),
        "beta": round_to(beta),
        "log_decay": None,
        "initial_state": None,
        "segment_ids": None,
    }
    if case.decay:
        inputs["log_decay"] = np.asarray(rng.uniform(case.decay_min, 0.0, (B, T, H)), np.float32).astype(np.float64)
    if case.initial_state:
        inputs["initial_state"] = np.asarray(rng.standard_normal((B, H, K, V)), np.float32).astype(np.float64)
    if case.segments:  # about four segments per row; ids reused after a change
        inputs["segment_ids"] = packed_segment_ids(rng, B, T)
    return inputs


def _cotangents(case: Case):
    rng = np.random.default_rng(1000 + case.seed)
    return (rng.standard_normal((case.B, case.T, case.H, case.V)),
            rng.standard_normal((case.B, case.H, case.K, case.V)))


def outputs_and_grads(impl: str, case: Case, inputs: dict, dtype) -> dict:
    """{o, final_state, d<name>...} for `impl`, q, k, v and beta cast to `dtype` (log_decay and
    initial_state stay float32 unless dtype is float64). Runs under jit."""
    w_o, w_s = _cotangents(case)
    seg = None if inputs["segment_ids"] is None else jnp.asarray(inputs["segment_ids"])
    gate_dtype = jnp.float64 if dtype == jnp.float64 else jnp.float32
    dtypes = (dtype, dtype, dtype, dtype, gate_dtype, gate_dtype)
    args = {name: None if inputs[name] is None else jnp.asarray(inputs[name], dt)
            for name, dt in zip(GRAD_NAMES, dtypes)}
    names = [name for name in GRAD_NAMES if args[name] is not None]

    def run(diff):
        full = {**args, **diff}
        return delta_rule(full["q"], full["k"], full["v"], full["beta"], full["log_decay"],
                          initial_state=full["initial_state"], segment_ids=seg,
                          return_final_state=True, chunk_size=case.chunk_size, implementation=impl)

    def loss(diff):
        o, state = run(diff)
        return (jnp.sum(o.astype(gate_dtype) * jnp.asarray(w_o, gate_dtype))
                + jnp.sum(state.astype(gate_dtype) * jnp.asarray(w_s, gate_dtype)))

    diff = {name: args[name] for name in names}
    (o, state), grads = jax.jit(lambda d: (run(d), jax.grad(loss)(d)))(diff)
    return {"o": o, "final_state": state, **{f"d{name}": grads[name] for name in names}}


@functools.lru_cache(maxsize=None)
def reference_float64(case: Case) -> dict:
    """The reference scan in float64 on the case's inputs: the ground truth, cached per case."""
    return float64_outputs(outputs_and_grads, case, make_inputs(case))


def assert_matches_reference(impl: str, case: Case, *, tolerance: float | None = None) -> dict:
    """Assert that `impl` matches the float64 reference on `case`: finite values, dtypes of the
    contract (o in the input dtype, final state float32) and relative errors <= tolerance (the
    case's default unless given). Returns the errors."""
    tolerance = case.tolerance if tolerance is None else tolerance
    inputs = make_inputs(case)
    got = outputs_and_grads(impl, case, inputs, jnp.dtype(case.dtype))
    want = reference_float64(case)
    return assert_close(impl, case, got, want, tolerance=tolerance, output="o", states=("final_state",))
