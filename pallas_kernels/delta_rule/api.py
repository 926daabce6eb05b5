"""The gated delta rule behind the implementation switch.

`delta_rule(q [B, T, H, K], k [B, T, H, K], v [B, T, H, V], beta [B, T, H], log_decay=None
[B, T, H], *, scale=None, initial_state=None [B, H, K, V], segment_ids=None [B, T],
return_final_state=False, chunk_size=64, implementation=None) -> (o [B, T, H, V] in v's dtype,
final_state [B, H, K, V] float32 or None)`

    S_0 = initial_state or 0
    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t^T v_t
        = a S_{t-1} + beta_t k_t^T (v_t - a k_t S_{t-1}),     a = exp(g_t)
    o_t = scale * q_t S_t,      scale = K ** -0.5

DeltaNet's update (Schlag et al. 2021; chunked training: Yang et al. 2024, "Parallelizing Linear
Transformers with the Delta Rule over Sequence Length") with Gated DeltaNet's decay (Yang, Kautz &
Hatamizadeh 2024): the memory S moves its answer for key k_t a fraction beta_t of the way to v_t,
after decaying by exp(g_t). The state is stored [K, V] (k^T v is the outer product), the
transpose of the paper's [V, K], as in `linear_attention`. `log_decay` g is None (no decay: plain
DeltaNet) or a scalar per head and step [B, T, H]; its values must be <= 0. beta is meant to lie
in [0, 1] and k to have ||k|| <= 1 (the layer L2-normalises q and k): then every step's transition
exp(g) (I - beta k k^T) is contractive. The op accepts any k and beta. With `segment_ids`, the
state is reset to zero where a new segment starts (segment_ids[:, t] != segment_ids[:, t-1]), so
a packed document gives what it gives alone: the initial state belongs to the first segment, the
final state is the state after the last step.

Implementations: `reference` (lax.scan of the definition), `xla` (chunked jnp, the WY / UT form),
`pallas_tpu`, `pallas_gpu` (Pallas kernels of the same chunked form, each with its own backward;
interpret mode when forced on a CPU) and `pallas` (pallas_tpu on TPU, pallas_gpu on GPU). Default
order: TPU (pallas_tpu, xla); GPU (pallas_gpu, xla); CPU (xla,). `auto` keeps only what
`verified.py` lists, so the kernels run only when named until they pass a device check.

Validation raises a one-line ValueError before any compute. The check that log_decay <= 0 needs
the values, so it runs only on concrete arrays (eager calls); under `jax.jit`, `grad` or `vmap` the
values are tracers and go unchecked.
"""

from collections.abc import Sequence

import jax

from hybrax.pallas_kernels.delta_rule import reference, xla
from hybrax.pallas_kernels import input_checks as checks
from hybrax.pallas_kernels.implementation import dispatch, lazy_backend, pallas_for_backend

_pallas_tpu = lazy_backend("hybrax.pallas_kernels.delta_rule", "tpu", "delta_rule")
_pallas_gpu = lazy_backend("hybrax.pallas_kernels.delta_rule", "gpu", "delta_rule")
_pallas = pallas_for_backend(_pallas_tpu, _pallas_gpu)

IMPLEMENTATIONS = {
    "reference": reference.delta_rule,
    "xla": xla.delta_rule,
    "pallas_tpu": _pallas_tpu,
    "pallas_gpu": _pallas_gpu,
    "pallas": _pallas,
}
DEFAULTS = {"tpu": ("pallas_tpu", "xla"), "gpu": ("pallas_gpu", "xla"), "default": ("xla",)}


def check_inputs(q, k, v, beta, log_decay, initial_state, segment_ids, chunk_size) -> None:
    """Raise a one-line ValueError for inputs the op does not accept."""
    B, T, H, K, V = checks.check_queries_keys_values(q, k, v)
    checks.check_per_head_step("beta", beta, B, T, H)
    if log_decay is not None:
        checks.check_per_head_step("log_decay", log_decay, B, T, H)
    checks.check_log_decay_values(log_decay)
    if initial_state is not None and initial_state.shape != (B, H, K, V):
        raise ValueError(f"initial_state shape {initial_state.shape} must be [B, H, K, V] = {(B, H, K, V)}")
    checks.check_segment_ids(segment_ids, B, T)
    checks.check_chunk_size(chunk_size)


def delta_rule(q: jax.Array, k: jax.Array, v: jax.Array, beta: jax.Array, log_decay: jax.Array | None = None,
               *, scale: float | None = None, initial_state: jax.Array | None = None,
               segment_ids: jax.Array | None = None, return_final_state: bool = False,
               chunk_size: int = 64, implementation: str | Sequence[str] | None = None,
               ) -> tuple[jax.Array, jax.Array | None]:
    """The gated delta rule; see the module docstring for the contract."""
    check_inputs(q, k, v, beta, log_decay, initial_state, segment_ids, chunk_size)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    return dispatch("delta_rule", IMPLEMENTATIONS, DEFAULTS, implementation, q, k, v, beta, log_decay,
                    scale=scale, initial_state=initial_state, segment_ids=segment_ids,
                    return_final_state=return_final_state, chunk_size=int(chunk_size))
