"""Capacity dispatch (GShard / Switch): each expert takes at most C tokens per dispatch group, the
overflowing assignments are dropped (their weight is lost, the residual carries the token), and
dispatch and combine are one-hot einsums.

Groups are the rows of the batch (T tokens each), C = ceil(T k / E * capacity_factor). Priority is
first choices before second choices, then token order: assignment (t, j) gets the slot
`#{(t', j') before it in that order with the same expert}`, and is kept if the slot is < C.
Decoding one token per row never drops (its k experts are distinct), so a capacity-mode model
decodes like its dropless twin, not like its own parallel forward.
"""

import jax
import jax.numpy as jnp


def slots(experts_TxK: jax.Array, num_experts: int) -> jax.Array:
    """Slot of each assignment within its expert in priority order, int32 [T, K]."""
    T, K = experts_TxK.shape
    onehot_KTxE = jax.nn.one_hot(experts_TxK.T.reshape(K * T), num_experts, dtype=jnp.int32)
    before_KTxE = jnp.cumsum(onehot_KTxE, axis=0) - onehot_KTxE
    slot_KT = jnp.sum(before_KTxE * onehot_KTxE, axis=-1)
    return slot_KT.reshape(K, T).T


def dispatch_and_combine(experts_BxTxK, weights_BxTxK, num_experts: int, capacity: int):
    """(dispatch one-hot [B, T, E, C], combine weights [B, T, E, C], kept mask bool [B, T, K])."""
    slot_BxTxK = jax.vmap(lambda e: slots(e, num_experts))(experts_BxTxK)
    kept_BxTxK = slot_BxTxK < capacity
    expert_1h = jax.nn.one_hot(experts_BxTxK, num_experts, dtype=jnp.float32)
    slot_1h = jax.nn.one_hot(jnp.where(kept_BxTxK, slot_BxTxK, capacity), capacity, dtype=jnp.float32)  # dropped: none
    dispatch_BxTxExC = jnp.einsum("btke,btkc->btec", expert_1h, slot_1h)
    combine_BxTxExC = jnp.einsum("btke,btkc,btk->btec", expert_1h, slot_1h, weights_BxTxK.astype(jnp.float32))
    return dispatch_BxTxExC, combine_BxTxExC, kept_BxTxK


def _mm(spec, a, b, dtype):
    """einsum of a and b rounded to `dtype`, accumulated in float32. XLA:CPU has no batched
    bfloat16 x bfloat16 -> float32 dot: there the rounded operands go in as float32 (exact), the
    same products and sums."""
    a, b = a.astype(dtype), b.astype(dtype)
    if jax.default_backend() == "cpu" and jnp.dtype(dtype) == jnp.bfloat16:
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def gather_slots(dispatch_BxTxExC, x_BxTxD, dtype) -> jax.Array:
    """Each expert's slots filled with their tokens, [B, E, C, D] in `dtype`."""
    return _mm("btec,btd->becd", dispatch_BxTxExC, x_BxTxD, jnp.dtype(dtype)).astype(dtype)


def expert_ffn_slots(xe_GxExCxD, w_gate, w_up, w_down, dtype) -> jax.Array:
    """SwiGLU of expert e on its slots, float32 [G, E, C, D]."""
    dtype = jnp.dtype(dtype)
    h = jax.nn.silu(_mm("gecd,edf->gecf", xe_GxExCxD, w_gate, dtype)) * _mm("gecd,edf->gecf", xe_GxExCxD, w_up, dtype)
    return _mm("gecf,efd->gecd", h.astype(dtype), w_down, dtype)


def capacity(x_BxTxD, experts_BxTxK, weights_BxTxK, w_gate, w_up, w_down, *, capacity: int, dtype):
    """(float32 [B, T, D] routed output, kept mask bool [B, T, K])."""
    dispatch, combine, kept_BxTxK = dispatch_and_combine(experts_BxTxK, weights_BxTxK, w_gate.shape[0], capacity)
    return slots_ffn(x_BxTxD, dispatch, combine, w_gate, w_up, w_down, dtype=dtype), kept_BxTxK


def slots_ffn(x_BxTxD, dispatch_BxTxExC, combine_BxTxExC, w_gate, w_up, w_down, *, dtype):
    """float32 [B, T, D]: each expert's slots filled by `dispatch`, run, and combined with `combine`
    (whatever chose the slots: token-choice capacity above, or expert choice)."""
    ye_BxExCxD = expert_ffn_slots(gather_slots(dispatch_BxTxExC, x_BxTxD, dtype), w_gate, w_up, w_down, dtype)
    return jnp.einsum("btec,becd->btd", combine_BxTxExC, ye_BxExCxD)
