"""What the recurrent ops' case modules share (linear_attention, delta_rule, mlstm, slstm).

Each `<op>_cases.py` defines its `Case`, inputs and `outputs_and_grads(impl, case, inputs, dtype)`
-> {name: array}; the ground truth is the same function on the `reference` implementation in
float64 (`float64_outputs`), and `assert_close` checks an implementation's dict against it: same
names, every value finite, the contract's dtypes, relative errors within the tolerance.
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def relative_error(got, want) -> float:
    """||got - want|| / ||want|| over the whole array (Frobenius norms)."""
    got = np.asarray(jnp.asarray(got).astype(jnp.float32), np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def packed_segment_ids(rng, B: int, T: int):
    """int32 [B, T]: about four segments per row, ids reused after a change (0, 1, 2, 0, ...)."""
    starts = rng.random((B, T)) < 4.0 / max(T, 1)
    return (np.cumsum(starts, axis=1) % 3).astype(np.int32)


def float32_inputs(inputs: dict) -> dict:
    """A case's numpy inputs as jax arrays: segment ids int32, the rest float32 (None stays None)."""
    return {n: None if a is None else jnp.asarray(a, jnp.int32 if n == "segment_ids" else jnp.float32)
            for n, a in inputs.items()}


def float64_outputs(outputs_and_grads: Callable, case, inputs: dict) -> dict:
    """outputs_and_grads("reference", case, inputs, float64) as float64 numpy arrays."""
    with jax.enable_x64(True):
        out = outputs_and_grads("reference", case, inputs, jnp.float64)
        return {name: np.asarray(x, np.float64) for name, x in out.items()}


def assert_close(impl: str, case, got: dict, want: dict, *, tolerance: float, output: str,
                 states: Sequence[str]) -> dict:
    """Assert `got` matches `want`: the same names, every value finite, `output` in the case's dtype
    and each of `states` float32, relative errors <= tolerance. Returns the errors."""
    assert set(got) == set(want), f"{impl}: returned {sorted(got)}, reference {sorted(want)}"
    dtype = jnp.dtype(case.dtype)
    assert got[output].dtype == dtype, f"{impl}: {output} dtype {got[output].dtype} != {case.dtype}"
    for name in states:
        assert got[name].dtype == jnp.float32, f"{impl}: {name} dtype {got[name].dtype}, not float32"
    errors = {}
    for name in want:
        value = np.asarray(jnp.asarray(got[name]).astype(jnp.float32))
        assert np.all(np.isfinite(value)), f"{impl} {case.id}: {name} has inf/NaN"
        errors[name] = relative_error(got[name], want[name])
    bad = {name: f"{err:.1e}" for name, err in errors.items() if not err <= tolerance}
    assert not bad, f"{impl} {case.id}: relative error > {tolerance:.0e} in {bad}"
    return errors
