"""Linear attention with decay behind the implementation switch.

`linear_attention(q [B, T, H, K], k [B, T, H, K], v [B, T, H, V], log_decay=None, *, scale=None,
initial_state=None [B, H, K, V], segment_ids=None [B, T], return_final_state=False, chunk_size=64,
implementation=None) -> (o [B, T, H, V], final_state [B, H, K, V] float32 or None)`

    S_0 = initial_state or 0
    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,      o_t = scale * q_t S_t,      scale = K ** -0.5

`log_decay` g is None (plain linear attention, Katharopoulos et al. 2020), `[B, T, H]` (a scalar
per head and step: RetNet, Lightning Attention, Mamba-2 SSD) or `[B, T, H, K]` (a gate per key
channel: GLA, Yang et al. 2023); its values must be <= 0. With `segment_ids`, the state is reset
to zero where a new segment starts (segment_ids[:, t] != segment_ids[:, t-1]): the initial state
belongs to the first segment, the final state is the state after the last step.

Implementations: `reference` (lax.scan of the definition), `xla` (chunked jnp), `pallas_tpu`,
`pallas_gpu` (Pallas kernels; interpret mode when forced on a CPU) and `pallas` (pallas_tpu on TPU,
pallas_gpu on GPU). Default order: TPU (pallas_tpu, xla); GPU (pallas_gpu, xla); CPU (xla,).

Validation raises a one-line ValueError before any compute. The check that log_decay <= 0 needs
the values, so it runs only on concrete arrays (eager calls); under `jax.jit`, `grad` or `vmap` the
values are tracers and go unchecked.
"""

from collections.abc import Sequence

import jax

from hybrax.pallas_kernels import input_checks as checks
from hybrax.pallas_kernels.implementation import dispatch, lazy_backend, pallas_for_backend
from hybrax.pallas_kernels.linear_attention import reference, xla


_pallas_tpu = lazy_backend("hybrax.pallas_kernels.linear_attention", "tpu", "linear_attention")
_pallas_gpu = lazy_backend("hybrax.pallas_kernels.linear_attention", "gpu", "linear_attention")
_pallas = pallas_for_backend(_pallas_tpu, _pallas_gpu)


IMPLEMENTATIONS = {
    "reference": reference.linear_attention,
    "xla": xla.linear_attention,
    "pallas_tpu": _pallas_tpu,
    "pallas_gpu": _pallas_gpu,
    "pallas": _pallas,
}
DEFAULTS = {"tpu": ("pallas_tpu", "xla"), "gpu": ("pallas_gpu", "xla"), "default": ("xla",)}


def check_inputs(q, k, v, log_decay, initial_state, segment_ids, chunk_size) -> None:
    """Raise a one-line ValueError for inputs the op does not accept."""
    B, T, H, K, V = checks.check_queries_keys_values(q, k, v)
    if log_decay is not None and log_decay.shape not in ((B, T, H), (B, T, H, K)):
        raise ValueError(f"log_decay shape {log_decay.shape} must be [B, T, H] = {(B, T, H)} "
                         f"or [B, T, H, K] = {(B, T, H, K)}")
    checks.check_log_decay_values(log_decay)
    if initial_state is not None and initial_state.shape != (B, H, K, V):
        raise ValueError(f"initial_state shape {initial_state.shape} must be [B, H, K, V] = {(B, H, K, V)}")
    checks.check_segment_ids(segment_ids, B, T)
    checks.check_chunk_size(chunk_size)


def linear_attention(q: jax.Array, k: jax.Array, v: jax.Array, log_decay: jax.Array | None = None, *,
                     scale: float | None = None, initial_state: jax.Array | None = None,
                     segment_ids: jax.Array | None = None, return_final_state: bool = False,
                     chunk_size: int = 64, implementation: str | Sequence[str] | None = None,
                     ) -> tuple[jax.Array, jax.Array | None]:
    """Causal linear attention with optional decay; see the module docstring for the contract."""
    check_inputs(q, k, v, log_decay, initial_state, segment_ids, chunk_size)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    return dispatch("linear_attention", IMPLEMENTATIONS, DEFAULTS, implementation, q, k, v, log_decay,
                    scale=scale, initial_state=initial_state, segment_ids=segment_ids,
                    return_final_state=return_final_state, chunk_size=int(chunk_size))
