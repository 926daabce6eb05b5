"""mLSTM over the mesh axis `seq`: every chunk maps the incoming cell state to its outgoing one by a
scaling plus its own contribution, so one all-gather of per-chunk records suffices (LASP-2's idea,
layers/linear/lasp2.py, for a stabilised state).

In raw (unstabilised) terms the state (C, n) of `pallas_kernels.mlstm` entering chunk j + 1 is

    S^in_{j+1} = m_{j+1} (A_j S^in_j + S_j),      A_j = exp(lf_1 + .. + lf_c) over chunk j

with S_j the chunk's final state from a zero state, A_j = 0 if a segment starts in the chunk after
its first token, and m_{j+1} = 0 where chunk j + 1 starts a new segment. The op carries (C~, n~, m)
= (C, n) exp(-m) with the stabiliser m, so the prefix runs in log space:

    m_out = max(log A_j + m^in, m_j),   C~_out = exp(log A_j + m^in - m_out) C~^in + exp(m_j - m_out) C~_j

(n~ alike), every exponent <= 0. Outputs do not depend on the stabiliser (h = q C / max(|q n|, 1) in
raw terms), so any consistent m gives one device's result.

Two passes of the op per device: the first, from a zero state, gives each local chunk's final
state (C~_j, n~_j, m_j); ONE all_gather over `seq` of (C~_j, n~_j, m_j, log A_j, survives, first and
last segment id) per chunk, [P, 2, b, H K V + H K + 2 H + 5] float32, independent of T; a prefix over
the 2P chunks in natural order; the second pass runs each local chunk from its incoming state.
The backward is autodiff's: the all_gather transposes to one reduce-scatter of the same size. The
price is the op's forward run twice per device (its first outputs are discarded); the exchange
itself is as small as LASP-2's.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from hybrax.layers.sequence_parallel import chunk_states, local_chunks
from hybrax.layers.sequence_parallel.layout import check_length, seq_size
from hybrax.layers.sharding import spec
from hybrax.pallas_kernels.mlstm import mlstm


def mlstm_sequence_parallel(q_BxTxHxK, k_BxTxHxK, v_BxTxHxV, li_BxTxH, lf_BxTxH, *, scale: float,
                            segment_ids=None, chunk_size: int = 64, implementation=None) -> jax.Array:
    """`mlstm` over the mesh axis `seq` (from `jax.set_mesh`), zero initial state.

    Inputs in stored (zigzag) order, sharded over `seq` on T (layout.py): q, k `[B, T, H, K]`,
    v `[B, T, H, V]`, the log input and forget gates `[B, T, H]`, segment_ids `[B, T]`. Returns
    h `[B, T, H, V]` in v's dtype, same order and sharding. T must be a multiple of 2 * seq.
    """
    check_length(q_BxTxHxK.shape[1], seq_size())
    names = ("batch", "length", "heads", None)
    arrays = {"q": q_BxTxHxK, "k": k_BxTxHxK, "v": v_BxTxHxV, "li": li_BxTxH, "lf": lf_BxTxH,
              "segment_ids": segment_ids}
    arrays = {name: a for name, a in arrays.items() if a is not None}
    specs = {name: spec(names[:a.ndim], a.shape) for name, a in arrays.items()}
    local = functools.partial(_local, scale=scale, chunk_size=chunk_size, implementation=implementation)
    return jax.shard_map(local, in_specs=(specs,), out_specs=specs["v"], check_vma=False)(arrays)


def _local(arrays, *, scale, chunk_size, implementation):
    q, k, v, li, lf = (local_chunks.stack(arrays[n]) for n in ("q", "k", "v", "li", "lf"))
    seg = local_chunks.stack(arrays["segment_ids"]) if "segment_ids" in arrays else None
    two_b, c, H, K = q.shape
    V = v.shape[-1]
    run = functools.partial(mlstm, q, k, v, li, lf, scale=scale, segment_ids=seg, return_final_state=True,
                            chunk_size=min(chunk_size, c), implementation=implementation)
    _, (c_loc, n_loc, m_loc) = run()
    log_a = jnp.sum(lf.astype(jnp.float32), axis=1)  # [2b, H]
    record = jnp.concatenate([c_loc.reshape(two_b, -1), n_loc.reshape(two_b, -1), m_loc, log_a,
                              chunk_states.survives(seg, two_b)[:, None],
                              chunk_states.pack_bounds(chunk_states.segment_bounds(seg), two_b)], axis=-1)
    gathered = chunk_states.gather_chunks(chunk_states.split_local(record.astype(jnp.float32)))  # [2P, b, n]
    sizes = [H * K * V, H * K, H, H, 1, 4]
    c_all, n_all, m_all, log_a_all, survives_all, bounds_all = jnp.split(
        gathered, np.cumsum(sizes)[:-1].tolist(), axis=-1)
    b = two_b // 2
    keep = chunk_states.seams_continue(bounds_all)  # [2P, b]
    keep_next = jnp.concatenate([keep[1:], jnp.zeros_like(keep[:1])])

    def step(incoming, xs):
        c_j, n_j, m_j, log_a_j, survives_j, keep_j = xs
        c_in, n_in, m_in = incoming
        alive = survives_j[:, :1] > 0  # [b, 1]
        m_out = jnp.where(alive, jnp.maximum(log_a_j + m_in, m_j), m_j)
        carried = jnp.where(alive, jnp.exp(log_a_j + m_in - m_out), 0.0)  # [b, H], exponent <= 0
        fresh = jnp.exp(m_j - m_out)
        c_out = carried[..., None, None] * c_in + fresh[..., None, None] * c_j
        n_out = carried[..., None] * n_in + fresh[..., None] * n_j
        return ((keep_j[:, None, None, None] * c_out, keep_j[:, None, None] * n_out, keep_j[:, None] * m_out),
                (c_in, n_in, m_in))

    zeros = (jnp.zeros((b, H, K, V), jnp.float32), jnp.zeros((b, H, K), jnp.float32), jnp.zeros((b, H), jnp.float32))
    xs = (c_all.reshape(-1, b, H, K, V), n_all.reshape(-1, b, H, K), m_all, log_a_all, survives_all, keep_next)
    _, incoming_all = jax.lax.scan(step, zeros, xs)
    incoming = tuple(chunk_states.pick_local(x).reshape(two_b, *x.shape[2:]) for x in incoming_all)
    h, _ = run(initial_state=incoming)
    return local_chunks.unstack(h)
