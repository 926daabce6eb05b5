"""The gated delta rule over the mesh axis `seq`: each device's chunk is an affine map of the state
that enters it, so one all-gather of those maps per layer suffices (LASP-2's exchange,
layers/linear/lasp2.py, with a K x K transition in place of a diagonal decay).

The recurrence of `pallas_kernels.delta_rule`, S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t^T v_t,
is affine in the state, so over chunk j

    S_out = M_j S^in + F_j,     M_j = prod_t a_t (I - beta_t k_t k_t^T)   [K, K],   F_j [K, V]

with F_j the chunk's final state from a zero state, and M_j = 0 if a segment starts in the chunk
after its first token (the op resets the state there). Both come from ONE run of the op on the
widened values [v | 0] from the initial state [0 | I]: the final state is [F_j | M_j], since the
zero values leave the identity block transported by the transitions alone. Then ONE all_gather
over `seq` of (F_j, M_j, first and last segment id) per chunk, [P, 2, b, H K (V + K) + 4] float32,
independent of T; the prefix S^in_{j+1} = m_{j+1} (M_j S^in_j + F_j) in natural chunk order
(m_{j+1} = 0 where chunk j + 1 starts a new segment); and a second run of the op on each local
chunk from its incoming state gives the outputs. The backward is autodiff's (the all_gather
transposes to a reduce-scatter of the same size). The price: the op runs twice per device, the
first time with V + K value columns.
"""

import functools

import jax
import jax.numpy as jnp

from hybrax.layers.sequence_parallel import chunk_states, local_chunks
from hybrax.layers.sequence_parallel.layout import check_length, seq_size
from hybrax.layers.sharding import spec
from hybrax.pallas_kernels.delta_rule import delta_rule

PRECISION = jax.lax.Precision.HIGHEST


def delta_rule_sequence_parallel(q_BxTxHxK, k_BxTxHxK, v_BxTxHxV, beta_BxTxH, log_decay_BxTxH=None, *,
                                 scale: float, segment_ids=None, chunk_size: int = 64,
                                 implementation=None) -> jax.Array:
    """`delta_rule` over the mesh axis `seq` (from `jax.set_mesh`), zero initial state.

    Inputs in stored (zigzag) order, sharded over `seq` on T (layout.py): q, k `[B, T, H, K]`,
    v `[B, T, H, V]`, beta and log_decay `[B, T, H]`, segment_ids `[B, T]`. Returns o `[B, T, H, V]`
    in v's dtype, same order and sharding. T must be a multiple of 2 * seq.
    """
    check_length(q_BxTxHxK.shape[1], seq_size())
    names = ("batch", "length", "heads", None)
    arrays = {"q": q_BxTxHxK, "k": k_BxTxHxK, "v": v_BxTxHxV, "beta": beta_BxTxH, "log_decay": log_decay_BxTxH,
              "segment_ids": segment_ids}
    arrays = {name: a for name, a in arrays.items() if a is not None}
    specs = {name: spec(names[:a.ndim], a.shape) for name, a in arrays.items()}
    local = functools.partial(_local, scale=scale, chunk_size=chunk_size, implementation=implementation)
    return jax.shard_map(local, in_specs=(specs,), out_specs=specs["v"], check_vma=False)(arrays)


def _local(arrays, *, scale, chunk_size, implementation):
    q, k, v, beta = (local_chunks.stack(arrays[n]) for n in ("q", "k", "v", "beta"))
    g = local_chunks.stack(arrays["log_decay"]) if "log_decay" in arrays else None
    seg = local_chunks.stack(arrays["segment_ids"]) if "segment_ids" in arrays else None
    two_b, c, H, K = q.shape
    V = v.shape[-1]
    run = functools.partial(delta_rule, q, k, beta=beta, log_decay=g, scale=scale, segment_ids=seg,
                            chunk_size=min(chunk_size, c), implementation=implementation)
    widened = jnp.concatenate([v, jnp.zeros((two_b, c, H, K), v.dtype)], axis=-1)
    identity = jnp.broadcast_to(jnp.eye(K, dtype=jnp.float32), (two_b, H, K, K))
    start = jnp.concatenate([jnp.zeros((two_b, H, K, V), jnp.float32), identity], axis=-1)
    _, final = run(widened, initial_state=start, return_final_state=True)  # [2b, H, K, V + K] = [F | M]
    record = jnp.concatenate([final.astype(jnp.float32).reshape(two_b, -1),
                              chunk_states.pack_bounds(chunk_states.segment_bounds(seg), two_b)], axis=-1)
    gathered = chunk_states.gather_chunks(chunk_states.split_local(record))  # [2P, b, n]
    b = two_b // 2
    maps = gathered[..., :-4].reshape(-1, b, H, K, V + K)
    keep = chunk_states.seams_continue(gathered[..., -4:])  # [2P, b]
    keep_next = jnp.concatenate([keep[1:], jnp.zeros_like(keep[:1])])

    def step(incoming, xs):
        map_j, keep_j = xs
        outgoing = map_j[..., :V] + jnp.einsum("bhij,bhjv->bhiv", map_j[..., V:], incoming, precision=PRECISION)
        return keep_j[:, None, None, None] * outgoing, incoming

    _, incoming_all = jax.lax.scan(step, jnp.zeros((b, H, K, V), jnp.float32), (maps, keep_next))
    incoming = chunk_states.pick_local(incoming_all).reshape(two_b, H, K, V)
    o, _ = run(v, initial_state=incoming)
    return local_chunks.unstack(o)
