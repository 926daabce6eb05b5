"""The sLSTM recurrence behind the implementation switch.

`slstm(gate_inputs [B, T, H, 4, D], recurrent_weights [H, D, 4, D], *, initial_state=None,
segment_ids=None [B, T], return_final_state=False, implementation=None)
-> (h [B, T, H, D] in gate_inputs' dtype, final_state (c, n, m, h) each [B, H, D] float32 or None)`
(the state is float64 where the inputs are, under `jax.enable_x64`)

    (i~, f~, z~, o~)_t = gate_inputs_t + h_{t-1} R          (per head: [D] @ [D, 4, D])
    lf_t = log_sigmoid(f~_t)
    m_t  = max(lf_t + m_{t-1}, i~_t)
    i'_t = exp(i~_t - m_t),   f'_t = exp(lf_t + m_{t-1} - m_t)
    c_t  = f'_t c_{t-1} + i'_t tanh(z~_t)
    n_t  = f'_t n_{t-1} + i'_t
    h_t  = sigmoid(o~_t) c_t / n_t

sLSTM (Beck et al. 2024, "xLSTM: Extended Long Short-Term Memory"): exponential input gate,
sigmoid forget gate, normaliser n and stabiliser m; H heads with block-diagonal recurrent weights
as in FlashRNN (Pöppel et al. 2024). gate_inputs are the input projections W x_t + b of the gates
in the order (i, f, z, o); R[h, :, g, :] maps head h's h_{t-1} [D] to gate g's pre-activation.
m only rescales (c, n): h is independent of it. (c_0, n_0, m_0, h_0) = initial_state or zeros. With
`segment_ids`, the state entering a step where a new segment starts (segment_ids[:, t] !=
segment_ids[:, t-1]) is zeros, all four parts, so a packed document gives what it gives alone; the
initial state belongs to the first segment, the final state is the state after the last step.

After one step n > 0 (see reference.py): h = 0 / 0 only where exp(i~ - m) underflows right after a
zero state (i~ below about -87 in float32); the division is clamped there, giving h = 0.

Implementations: `reference` (lax.scan of the definition, autodiff), `xla` (fused-matmul scan with
its own backward), `pallas_tpu`, `pallas_gpu` (FlashRNN-style fused kernels with their own
backward kernels; interpret mode when forced on a CPU; float32/bfloat16 inputs, float64 refused)
and `pallas` (pallas_tpu on TPU, pallas_gpu on GPU). Default order: TPU (pallas_tpu, xla); GPU
(pallas_gpu, xla); CPU (xla,). auto runs only implementations listed in verified.py.

Validation raises a one-line ValueError before any compute.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from hybrax.pallas_kernels import input_checks as checks
from hybrax.pallas_kernels.implementation import dispatch, lazy_backend, pallas_for_backend
from hybrax.pallas_kernels.slstm import reference, xla


_pallas_tpu = lazy_backend("hybrax.pallas_kernels.slstm", "tpu", "slstm")
_pallas_gpu = lazy_backend("hybrax.pallas_kernels.slstm", "gpu", "slstm")
_pallas = pallas_for_backend(_pallas_tpu, _pallas_gpu)


IMPLEMENTATIONS = {
    "reference": reference.slstm,
    "xla": xla.slstm,
    "pallas_tpu": _pallas_tpu,
    "pallas_gpu": _pallas_gpu,
    "pallas": _pallas,
}
# auto keeps only rows of verified.py: the Pallas kernels are not there (no device run yet), so
# auto still runs xla; a forced name runs them.
DEFAULTS = {"tpu": ("pallas_tpu", "xla"), "gpu": ("pallas_gpu", "xla"), "default": ("xla",)}

STATE_NAMES = ("c", "n", "m", "h")


def check_inputs(gate_inputs, recurrent_weights, initial_state, segment_ids) -> None:
    """Raise a one-line ValueError for inputs the op does not accept."""
    if gate_inputs.ndim != 5 or gate_inputs.shape[3] != 4:
        raise ValueError(f"gate_inputs must be [batch, time, heads, 4, dim] (gates i, f, z, o); "
                         f"got shape {gate_inputs.shape}")
    if not jnp.issubdtype(gate_inputs.dtype, jnp.floating):
        raise ValueError(f"gate_inputs dtype {gate_inputs.dtype} must be a floating dtype")
    B, T, H, _, D = gate_inputs.shape
    if recurrent_weights.shape != (H, D, 4, D):
        raise ValueError(f"recurrent_weights shape {recurrent_weights.shape} must be [H, D, 4, D] = "
                         f"{(H, D, 4, D)}")
    if not jnp.issubdtype(recurrent_weights.dtype, jnp.floating):
        raise ValueError(f"recurrent_weights dtype {recurrent_weights.dtype} must be a floating dtype")
    if initial_state is not None:
        if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 4:
            kind = (f"a {type(initial_state).__name__} of {len(initial_state)}"
                    if isinstance(initial_state, (tuple, list)) else type(initial_state).__name__)
            raise ValueError(f"initial_state must be a tuple (c, n, m, h) of 4 arrays [B, H, D]; got {kind}")
        for name, part in zip(STATE_NAMES, initial_state):
            if getattr(part, "shape", None) != (B, H, D):
                raise ValueError(f"initial_state {name} shape {getattr(part, 'shape', None)} must be "
                                 f"[B, H, D] = {(B, H, D)}")
    checks.check_segment_ids(segment_ids, B, T)


def slstm(gate_inputs: jax.Array, recurrent_weights: jax.Array, *,
          initial_state: tuple[jax.Array, jax.Array, jax.Array, jax.Array] | None = None,
          segment_ids: jax.Array | None = None, return_final_state: bool = False,
          implementation: str | Sequence[str] | None = None,
          ) -> tuple[jax.Array, tuple[jax.Array, ...] | None]:
    """The sLSTM recurrence; see the module docstring for the contract."""
    check_inputs(gate_inputs, recurrent_weights, initial_state, segment_ids)
    if initial_state is not None:
        initial_state = tuple(initial_state)
    return dispatch("slstm", IMPLEMENTATIONS, DEFAULTS, implementation, gate_inputs, recurrent_weights,
                    initial_state=initial_state, segment_ids=segment_ids,
                    return_final_state=return_final_state)
