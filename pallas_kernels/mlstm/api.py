"""The mLSTM cell (xLSTM's matrix memory) behind the implementation switch.

`mlstm(q [B, T, H, K], k [B, T, H, K], v [B, T, H, V], log_input_gate [B, T, H],
log_forget_gate [B, T, H], *, scale=None, initial_state=None, segment_ids=None [B, T],
return_final_state=False, chunk_size=64, implementation=None) -> (h [B, T, H, V],
final_state or None)`

    m_t = max(lf_t + m_{t-1}, li_t)
    C_t = exp(lf_t + m_{t-1} - m_t) C_{t-1} + exp(li_t - m_t) k_t^T v_t
    n_t = exp(lf_t + m_{t-1} - m_t) n_{t-1} + exp(li_t - m_t) k_t
    h_t = (scale q_t C_t) / max(|scale q_t . n_t|, exp(-m_t)),      scale = K ** -0.5

li = log_input_gate is the exponential input gate's pre-activation (i = exp(li), any real); lf =
log_forget_gate is usually log_sigmoid of a pre-activation (<= 0), but any real is accepted (an
exponential forget gate). The state is a tuple (C [B, H, K, V], n [B, H, K], m [B, H]), float32:
C and n are stabilised by m (the raw memory is C exp(m)), (C_0, n_0, m_0) = initial_state or
(0, 0, 0). This is the stabilised mLSTM of xLSTM (Beck et al. 2024; xLSTM 7B, Beck et al. 2025).

h does not depend on the stabiliser m (in raw terms h = scale q C / max(|scale q n|, 1)), so its
gradient through m is zero, as in the xLSTM kernels; the final state's m is the max of the
log-coefficients of everything that entered the memory, differentiable through that max (at a tie
the gradient goes to the newest term).

With `segment_ids`, the state entering a step where a new segment starts (segment_ids[:, t] !=
segment_ids[:, t-1]) is (0, 0, 0), exactly as for a fresh sequence: the initial state belongs to the
first segment, the final state is the state after the last step. h comes back in v's dtype.

Implementations: `reference` (lax.scan of the definition), `xla` (chunked jnp), `pallas_tpu`,
`pallas_gpu` (Pallas kernels; interpret mode when forced on a CPU) and `pallas` (pallas_tpu on TPU,
pallas_gpu on GPU). Default order: TPU (pallas_tpu, xla); GPU (pallas_gpu, xla); CPU (xla,); `auto`
keeps only the rows of verified.py (the kernels have not run on hardware, so today it runs xla).

Validation raises a one-line ValueError before any compute; it checks shapes and dtypes only (no
gate value is out of range).
"""

from collections.abc import Sequence

import jax

from hybrax.pallas_kernels import input_checks as checks
from hybrax.pallas_kernels.implementation import dispatch, lazy_backend, pallas_for_backend
from hybrax.pallas_kernels.mlstm import reference, xla

State = tuple[jax.Array, jax.Array, jax.Array]

_pallas_tpu = lazy_backend("hybrax.pallas_kernels.mlstm", "tpu", "mlstm")
_pallas_gpu = lazy_backend("hybrax.pallas_kernels.mlstm", "gpu", "mlstm")
_pallas = pallas_for_backend(_pallas_tpu, _pallas_gpu)

IMPLEMENTATIONS = {
    "reference": reference.mlstm,
    "xla": xla.mlstm,
    "pallas_tpu": _pallas_tpu,
    "pallas_gpu": _pallas_gpu,
    "pallas": _pallas,
}
DEFAULTS = {"tpu": ("pallas_tpu", "xla"), "gpu": ("pallas_gpu", "xla"), "default": ("xla",)}


def check_inputs(q, k, v, log_input_gate, log_forget_gate, initial_state, segment_ids, chunk_size) -> None:
    """Raise a one-line ValueError for inputs the op does not accept."""
    B, T, H, K, V = checks.check_queries_keys_values(q, k, v)
    checks.check_per_head_step("log_input_gate", log_input_gate, B, T, H)
    checks.check_per_head_step("log_forget_gate", log_forget_gate, B, T, H)
    if initial_state is not None:
        want = ((B, H, K, V), (B, H, K), (B, H))
        if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 3:
            raise ValueError(f"initial_state must be a tuple (C, n, m) of shapes {want}; "
                             f"got {type(initial_state).__name__}")
        got = tuple(tuple(x.shape) for x in initial_state)
        if got != want:
            raise ValueError(f"initial_state shapes {got} must be (C [B, H, K, V], n [B, H, K], m [B, H]) = {want}")
    checks.check_segment_ids(segment_ids, B, T)
    checks.check_chunk_size(chunk_size)


def mlstm(q: jax.Array, k: jax.Array, v: jax.Array, log_input_gate: jax.Array, log_forget_gate: jax.Array,
          *, scale: float | None = None, initial_state: State | None = None,
          segment_ids: jax.Array | None = None, return_final_state: bool = False, chunk_size: int = 64,
          implementation: str | Sequence[str] | None = None) -> tuple[jax.Array, State | None]:
    """The stabilised mLSTM cell over a sequence; see the module docstring for the contract."""
    check_inputs(q, k, v, log_input_gate, log_forget_gate, initial_state, segment_ids, chunk_size)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    if initial_state is not None:
        initial_state = tuple(initial_state)
    return dispatch("mlstm", IMPLEMENTATIONS, DEFAULTS, implementation, q, k, v, log_input_gate,
                    log_forget_gate, scale=scale, initial_state=initial_state, segment_ids=segment_ids,
                    return_final_state=return_final_state, chunk_size=int(chunk_size))
