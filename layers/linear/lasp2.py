"""LASP-2 sequence parallelism for the linear-attention family (Sun, Lan, Zhong, Qu & Cheng, 2025,
"LASP-2: Rethinking Sequence Parallelism for Linear Attention and Its Hybrid").

The recurrence of `pallas_kernels.linear_attention`,

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,      o_t = scale * q_t S_t,

is linear in the state, so with the sequence cut into 2P chunks of c = T / (2P) tokens (P devices
on `seq`, zigzag layout: device d holds natural chunks d and 2P - 1 - d, see layout.py) each chunk j
splits into a local part and a carried part:

    o_t   = o^loc_t + scale * q_t diag(a_t) S^in_j        a_t = exp(g_1 + .. + g_t)   (t in the chunk)
    S^in_0 = 0,   S^in_{j+1} = m_{j+1} (S_j + diag(A_j) S^in_j)

with o^loc, S_j the chunked op's output and final state on the chunk alone from a zero state,
A_j = a_c the chunk's total decay, and the segment resets as 0/1 factors: a_t = 0 once a segment
starts in the chunk after its first token (A_j = 0 if one starts anywhere after it), m_j = 0 where
the first token of chunk j starts a segment (its id differs from the last id of chunk j - 1).

Forward: the op on both local chunks at once (stacked on the batch dim), ONE all_gather over `seq`
of every chunk's (S_j, A_j, first and last segment id) packed into one float32 buffer
[P, 2, b, H K V + H K' + 4] (K' = K for per-channel gates, else 1; ids as in packing.py), the prefix above in
natural chunk order, and the carried term. Backward (`custom_vjp` of that exchange): ONE all_gather
of the cotangents dS^in of the local chunks, then the suffix recurrence

    dF_{2P-1} = 0,   dS_j = dF_j,   dA_j = sum_V dF_j * S^in_j,   dF_{j-1} = m_j (dS^in_j + diag(A_j) dF_j)

(summed over K too for scalar decay). Neither collective depends on T. The local parts (the op,
a_t, A_j) are differentiated by autodiff, so learned decays (GLA, Mamba-2) get their gradients.
"""

import functools

import jax
import jax.numpy as jnp

from hybrax.layers.sequence_parallel import local_chunks
from hybrax.layers.sequence_parallel.chunk_states import gather_chunks, pick_local
from hybrax.layers.sequence_parallel.layout import check_length, seq_size
from hybrax.layers.sequence_parallel.packing import float32_to_ids, ids_to_float32
from hybrax.layers.sharding import spec
from hybrax.pallas_kernels.linear_attention import linear_attention

PRECISION = jax.lax.Precision.HIGHEST  # float32 matmuls, as in the op's xla implementation


def linear_attention_sequence_parallel(q_BxTxHxK, k_BxTxHxK, v_BxTxHxV, log_decay=None, *, scale: float,
                                       segment_ids=None, chunk_size: int = 64, implementation=None) -> jax.Array:
    """`linear_attention` over the mesh axis `seq` (from `jax.set_mesh`), zero initial state.

    Inputs are in stored (zigzag) order and sharded over `seq` on T (layout.py): q, k `[B, T, H, K]`,
    v `[B, T, H, V]`, log_decay None / `[B, T, H]` / `[B, T, H, K]`, segment_ids `[B, T]`. Returns
    o `[B, T, H, V]` in v's dtype, in the same order and sharding. T must be a multiple of 2 * seq.
    """
    num_devices = seq_size()
    check_length(q_BxTxHxK.shape[1], num_devices)
    names = ("batch", "length", "heads", None)
    arrays = {"q": q_BxTxHxK, "k": k_BxTxHxK, "v": v_BxTxHxV, "log_decay": log_decay, "segment_ids": segment_ids}
    arrays = {name: a for name, a in arrays.items() if a is not None}
    specs = {name: spec(names[:a.ndim], a.shape) for name, a in arrays.items()}
    local = functools.partial(_local, scale=scale, chunk_size=chunk_size, implementation=implementation)
    return jax.shard_map(local, in_specs=(specs,), out_specs=specs["v"], check_vma=False)(arrays)


def _carried_decay(log_decay, segment_ids, shape):
    """a_t of the module docstring, float32 `shape` = [2b, c, H, K'] (K' = K or 1)."""
    if log_decay is None:
        a = jnp.ones(shape, jnp.float32)
    else:
        g = log_decay.astype(jnp.float32)
        g = g if g.ndim == 4 else g[..., None]
        a = jnp.exp(jnp.cumsum(g, axis=1))  # prefix sums of g <= 0: no overflow, no differences
    if segment_ids is not None:
        starts = segment_ids[:, 1:] != segment_ids[:, :-1]
        alive = jnp.concatenate([jnp.ones_like(starts[:, :1]), jnp.cumsum(starts, axis=1) == 0], axis=1)
        a = a * alive[:, :, None, None]
    return jnp.broadcast_to(a, shape)


def _local(arrays, *, scale, chunk_size, implementation):
    q, k, v = (local_chunks.stack(arrays[n]) for n in "qkv")
    g = local_chunks.stack(arrays["log_decay"]) if "log_decay" in arrays else None
    seg = local_chunks.stack(arrays["segment_ids"]) if "segment_ids" in arrays else None
    two_b, c, H, K = q.shape
    # a local chunk shorter than the op's chunk is one chunk: no kernel steps over padding
    o_loc, final = linear_attention(q, k, v, g, scale=scale, segment_ids=seg, return_final_state=True,
                                    chunk_size=min(chunk_size, c), implementation=implementation)
    per_channel = g is not None and g.ndim == 4
    a = _carried_decay(g, seg, (two_b, c, H, K if per_channel else 1))
    if seg is None:
        bounds = jnp.zeros((two_b, 2), jnp.int32)  # one segment: every seam continues
    else:
        bounds = jnp.stack([seg[:, 0], seg[:, -1]], axis=1).astype(jnp.int32)
    split = lambda x: x.reshape(2, two_b // 2, *x.shape[1:])
    incoming = _incoming_states(split(final.astype(jnp.float32)), split(a[:, -1]), split(bounds))
    incoming = incoming.reshape(two_b, *incoming.shape[2:])
    carried = jnp.einsum("bthk,bhkv->bthv", q.astype(jnp.float32) * a, incoming, precision=PRECISION)
    o = o_loc.astype(jnp.float32) + scale * carried
    return local_chunks.unstack(o.astype(v.dtype))


@jax.custom_vjp
def _incoming_states(states_2xbxHxKxV, decays_2xbxHxK_, bounds_2xbx2):
    """S^in of this device's two chunks, [2, b, H, K, V] float32, from every chunk's final state S_j,
    total decay A_j and (first, last) segment id, exchanged by one all_gather over `seq`."""
    return _incoming_states_fwd(states_2xbxHxKxV, decays_2xbxHxK_, bounds_2xbx2)[0]


def _incoming_states_fwd(states, decays, bounds):
    two, b, H, K, V = states.shape
    packed = jnp.concatenate([states.reshape(two, b, -1), decays.reshape(two, b, -1),
                              ids_to_float32(bounds).reshape(two, b, 4)], axis=-1)
    chunks = gather_chunks(packed)  # [2P, b, n]
    n_states, n_decays = H * K * V, decays[0, 0].size
    states_all = chunks[..., :n_states].reshape(-1, b, H, K, V)
    decays_all = chunks[..., n_states:n_states + n_decays].reshape(-1, *decays.shape[1:])
    bounds_all = float32_to_ids(chunks[..., n_states + n_decays:].reshape(-1, b, 2, 2))  # [2P, b, 2]
    continues = bounds_all[1:, :, 0] == bounds_all[:-1, :, 1]  # m_j, j >= 1: [2P - 1, b]
    keep = jnp.concatenate([jnp.zeros_like(continues[:1]), continues]).astype(jnp.float32)  # m_j, [2P, b]

    def step(incoming, xs):
        state, decay, keep_next = xs
        outgoing = state + decay[..., None] * incoming  # A [b, H, K'] over [b, H, K, V]
        return keep_next[:, None, None, None] * outgoing, incoming

    keep_next = jnp.concatenate([keep[1:], jnp.zeros_like(keep[:1])])
    _, incoming_all = jax.lax.scan(step, jnp.zeros_like(states_all[0]), (states_all, decays_all, keep_next))
    return pick_local(incoming_all), (incoming_all, decays_all, keep)


def _incoming_states_bwd(residuals, d_incoming_2xbxHxKxV):
    incoming_all, decays_all, keep = residuals
    d_incoming_all = gather_chunks(d_incoming_2xbxHxKxV)
    scalar = decays_all.shape[-1] == 1  # K' = 1: one decay per head, summed over K too

    def step(d_outgoing, xs):  # walks the chunks backwards; d_outgoing = dF_j
        d_in, incoming, decay, keep_j = xs
        d_decay = jnp.sum(d_outgoing * incoming, axis=-1)
        d_decay = jnp.sum(d_decay, axis=-1, keepdims=True) if scalar else d_decay
        d_total_in = d_in + decay[..., None] * d_outgoing
        return keep_j[:, None, None, None] * d_total_in, (d_outgoing, d_decay)

    _, (d_states, d_decays) = jax.lax.scan(step, jnp.zeros_like(incoming_all[0]),
                                           (d_incoming_all, incoming_all, decays_all, keep), reverse=True)
    return pick_local(d_states), pick_local(d_decays), None


_incoming_states.defvjp(_incoming_states_fwd, _incoming_states_bwd)
