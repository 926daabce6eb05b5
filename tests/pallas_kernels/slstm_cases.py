"""Shared inputs and assertions for every implementation of `slstm`.

A `Case` names one input configuration; `assert_matches_reference(impl, case)` runs the op with
`implementation=impl` and checks the output h, the final state (c, n, m, h) and the gradients of
gate_inputs, recurrent_weights and each part of the initial state (of a fixed random linear
functional of the outputs and the final state, every part of it) against the reference run in
float64 on the same inputs (rounded to the case's dtype first, so only the implementation's own
error is measured).

Error measure: ||got - want|| / ||want|| over the whole array (Frobenius norms), per array.
Tolerances: float32 inputs 1e-4. bfloat16 inputs 2e-2: h and the gradients of gate_inputs and R
come back rounded to bfloat16 (unit roundoff 2^-9 ~ 2e-3) while the recurrence itself runs in
float32; 2e-2 is about ten roundoffs, an order of magnitude below what a wrong gate, stabiliser
or segment rule produces (errors of order 1).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from hybrax.pallas_kernels.slstm import slstm
from reference_checks import assert_close, float64_outputs, packed_segment_ids
from refusals import ON_THE_OTHER_ACCELERATOR

# Refusals on purpose (refusals.py): any other NotImplementedError on these cases is a failure.
# Only the kernel of the other accelerator: on a CPU both kernels interpret every case.
REFUSED = [*ON_THE_OTHER_ACCELERATOR]

FLOAT32_TOLERANCE = 1e-4
BFLOAT16_TOLERANCE = 2e-2
STATE_NAMES = ("c", "n", "m", "h")
INPUT_GATES = ("normal", "+30", "-30", "uniform30")


@dataclasses.dataclass(frozen=True)
class Case:
    """One input configuration. gate_inputs are N(0, 1) except: input_gate "+30" / "-30" sets every
    input-gate pre-activation (gate_inputs[..., 0, :]) to +-30, "uniform30" draws it from U[-30, 30];
    forget_min (if set) draws the forget-gate inputs from U[forget_min, 2] (strong forgetting).
    R ~ N(0, (r_scale / sqrt(D))^2): r_scale 1 is the usual initialisation scale. segments: packed
    segment_ids with a few segments per row (ids need not increase, only changes count)."""
    T: int
    segments: bool = True
    initial_state: bool = True
    dtype: str = "float32"
    input_gate: str = "normal"
    forget_min: float | None = None
    r_scale: float = 1.0
    B: int = 2
    H: int = 2
    D: int = 8
    seed: int = 0

    @property
    def id(self) -> str:
        parts = [f"T{self.T}", self.dtype] + ["segments"] * self.segments + ["init"] * self.initial_state
        parts += [f"i={self.input_gate}"] * (self.input_gate != "normal")
        if self.forget_min is not None:
            parts.append(f"fmin={self.forget_min:g}")
        parts += [f"R{self.r_scale:g}"] * (self.r_scale != 1.0)
        parts += [f"B{self.B}H{self.H}D{self.D}"] * ((self.B, self.H, self.D) != (2, 2, 8))
        parts += [f"seed{self.seed}"] * (self.seed != 0)
        return "-".join(parts)

    @property
    def tolerance(self) -> float:
        return BFLOAT16_TOLERANCE if self.dtype == "bfloat16" else FLOAT32_TOLERANCE


def make_inputs(case: Case) -> dict:
    """Float64 numpy inputs (gate_inputs and recurrent_weights rounded to the case's dtype, the
    initial state to float32), int32 segment ids."""
    assert case.input_gate in INPUT_GATES, case.input_gate
    rng = np.random.default_rng(case.seed)
    B, T, H, D = case.B, case.T, case.H, case.D
    round_to = lambda x, dtype: np.asarray(jnp.asarray(x, dtype).astype(jnp.float32), np.float64)
    x = rng.standard_normal((B, T, H, 4, D))
    if case.input_gate == "uniform30":
        x[..., 0, :] = rng.uniform(-30.0, 30.0, (B, T, H, D))
    elif case.input_gate != "normal":
        x[..., 0, :] = float(case.input_gate)
    if case.forget_min is not None:
        x[..., 1, :] = rng.uniform(case.forget_min, 2.0, (B, T, H, D))
    inputs = {
        "gate_inputs": round_to(x, case.dtype),
        "recurrent_weights": round_to(rng.standard_normal((H, D, 4, D)) * case.r_scale / np.sqrt(D), case.dtype),
        "initial_state": None,
        "segment_ids": None,
    }
    if case.initial_state:  # a reachable-looking state: n > 0, |c| <= n, |h| < 1
        n0 = rng.uniform(0.5, 2.0, (B, H, D))
        state = (n0 * rng.uniform(-1, 1, (B, H, D)), n0, 2.0 * rng.standard_normal((B, H, D)),
                 rng.uniform(-0.9, 0.9, (B, H, D)))
        inputs["initial_state"] = tuple(round_to(s, jnp.float32) for s in state)
    if case.segments:  # about four segments per row; ids cycle, so an id is reused after a change
        inputs["segment_ids"] = packed_segment_ids(rng, B, T)
    return inputs


def _cotangents(case: Case):
    rng = np.random.default_rng(1000 + case.seed)
    return (rng.standard_normal((case.B, case.T, case.H, case.D)),
            tuple(rng.standard_normal((case.B, case.H, case.D)) for _ in STATE_NAMES))


def outputs_and_grads(impl: str, case: Case, inputs: dict, dtype) -> dict:
    """{h, final_<c|n|m|h>, dgate_inputs, drecurrent_weights, dinitial_<c|n|m|h>} for `impl`:
    gate_inputs and R cast to `dtype`, the initial state float32 (float64 if dtype is). Runs under
    jit; the loss reads the output and every part of the final state."""
    w_h, w_state = _cotangents(case)
    seg = None if inputs["segment_ids"] is None else jnp.asarray(inputs["segment_ids"])
    state_dtype = jnp.float64 if dtype == jnp.float64 else jnp.float32
    diff = {"gate_inputs": jnp.asarray(inputs["gate_inputs"], dtype),
            "recurrent_weights": jnp.asarray(inputs["recurrent_weights"], dtype)}
    if inputs["initial_state"] is not None:
        diff["initial_state"] = tuple(jnp.asarray(s, state_dtype) for s in inputs["initial_state"])

    def run(diff):
        return slstm(diff["gate_inputs"], diff["recurrent_weights"], initial_state=diff.get("initial_state"),
                     segment_ids=seg, return_final_state=True, implementation=impl)

    def loss(diff):
        h, final = run(diff)
        total = jnp.sum(h.astype(state_dtype) * jnp.asarray(w_h, state_dtype))
        total = total + sum(jnp.sum(s.astype(state_dtype) * jnp.asarray(w, state_dtype))
                            for s, w in zip(final, w_state))
        return total, (h, final)

    # One compilation: h and the final state come from the forward pass the gradients use (the
    # forward without gradients is checked against the reference in test_slstm.py).
    grads, (h, final) = jax.jit(jax.grad(loss, has_aux=True))(diff)
    out = {"h": h, **{f"final_{name}": s for name, s in zip(STATE_NAMES, final)},
           "dgate_inputs": grads["gate_inputs"], "drecurrent_weights": grads["recurrent_weights"]}
    if "initial_state" in grads:
        out.update({f"dinitial_{name}": g for name, g in zip(STATE_NAMES, grads["initial_state"])})
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
    return assert_close(impl, case, got, want, tolerance=tolerance, output="h",
                        states=tuple(f"final_{name}" for name in STATE_NAMES))
