"""Ring attention: causal softmax attention with the sequence split over the mesh axis `seq`
(Liu et al., 2023, "Ring Attention with Blockwise Transformers"; zigzag load balancing as in
zhuzilin/ring-flash-attention and Llama 3's context parallelism).

Every device keeps its T/P local queries, in the zigzag order of `layout` (chunks d and 2P-1-d of
c = T/(2P) tokens). The key/value blocks (with their segment ids) travel around the ring with
`ppermute` over `seq`, one hop per step, P steps; an online softmax (running max m, denominator l,
accumulator, all float32) folds each block into the local output:

    s = scale q k^T (masked),  m' = max(m, rowmax s),  l' = e^(m-m') l + rowsum e^(s-m'),
    acc' = e^(m-m') acc + e^(s-m') v,  o = acc / l,  lse = m + log l

Which keys a query sees is the rule of `pallas_kernels.dot_product_attention` with causal=True:
natural position of the key <= natural position of the query AND same segment. With zigzag chunks
the causal part is known per block, so every step does half a square of work, not a full one:

    own block (src == d):  the 2c x 2c square under the causal mask (chunk pair (d, 2P-1-d) is masked)
    src < d:               all 2c queries see the first key chunk (src) fully, the second (2P-1-src) not at all
    src > d:               only the second query chunk (2P-1-d) sees keys, and it sees both key chunks

(`jax.lax.switch` on the source device picks the case; the fully-future half is never computed.)
Every device computes 2P + 2 chunk-pair products (2P + 1 needed), the same on every device. Since
the case fixes the causal part, blocks travel with their segment ids only; the natural positions
(`layout.local_positions`) are needed for the own block's causal mask alone.

Gradients: a `jax.custom_vjp` whose backward is a second ring. Differentiating the forward loop
directly would save every step's [2c, 2c] probabilities (O(T * T/P) per device) or, with remat,
still gather them per step; instead the residuals are only the local q, k, v, output and
log-sum-exp (O(T/P) per device), and the backward recomputes each block's probabilities
p = exp(s - lse), ds = p * (do v^T - rowsum(do * o)), keeps dq local and sends each key/value block
around the ring together with its dk, dv accumulators; after P hops the accumulators are home.
Forward: P - 1 hops of (k, v, segment ids); backward: P - 1 hops of (k, v, segment ids) and P of
(dk, dv). The next key/value block is sent before the current one is used, so a hop can overlap
the compute. Nothing ever gathers the full sequence.

Memory per device: the residuals and the travelling blocks are O(T/P); each step's scores are one
[2c, 2c] square (or a half of it) per head, materialised by jnp. A fused block kernel that returns
its log-sum-exp could take their place to make that transient O(T/P) as well.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from layers.sequence_parallel.layout import SEQ_AXIS, check_length, local_positions, seq_size
from layers.sharding import current_mesh, spec
from pallas_kernels.dot_product_attention.mask import check_inputs

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static description of one call: softmax scale, ring size, mesh and shard_map specs."""

    scale: float
    num_devices: int
    mesh: object
    q: PartitionSpec       # [B, T, H, D]
    kv: PartitionSpec      # [B, T, Hkv, D]
    rows: PartitionSpec    # [B, T]
    lse: PartitionSpec     # [B, T, H]


def ring_attention(q_BxTxHxD: jax.Array, k_BxTxGxD: jax.Array, v_BxTxGxD: jax.Array, *,
                   segment_ids: jax.Array | None = None, scale: float | None = None) -> jax.Array:
    """Causal softmax attention over a sequence split on `seq`, in zigzag order: o [B, T, H, D].

    q [B, T, H, D], k and v [B, T, Hkv, D] (H a multiple of Hkv), segment_ids int [B, T] (None: one
    segment), all in stored (zigzag) order, inside `jax.set_mesh`. Equal to
    `dot_product_attention(causal=True, segment_ids=...)` on the natural order."""
    check_inputs(q_BxTxHxD, k_BxTxGxD, v_BxTxGxD, segment_ids, None)
    B, T, H, D = q_BxTxHxD.shape
    num_devices = seq_size()
    check_length(T, num_devices)
    if segment_ids is None:
        segment_ids = jnp.zeros((B, T), jnp.int32)
    q_spec = spec(("batch", "length", "heads", None), q_BxTxHxD.shape)
    kv_spec = spec(("batch", "length", "kv_heads", None), k_BxTxGxD.shape)
    if q_spec[2] != kv_spec[2]:   # heads and kv_heads must split alike to keep each group on one device
        q_spec, kv_spec = (PartitionSpec(*s[:2], None, None) for s in (q_spec, kv_spec))
    plan = _Plan(scale=D ** -0.5 if scale is None else float(scale), num_devices=num_devices,
                 mesh=current_mesh(), q=q_spec, kv=kv_spec, rows=PartitionSpec(*q_spec[:2]),
                 lse=PartitionSpec(*q_spec[:3]))
    return _ring_attention(q_BxTxHxD, k_BxTxGxD, v_BxTxGxD, segment_ids, plan)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _ring_attention(q, k, v, segment_ids, plan):
    return _forward(q, k, v, segment_ids, plan)[0]


def _forward(q, k, v, segment_ids, plan):
    local = functools.partial(_forward_local, scale=plan.scale, num_devices=plan.num_devices)
    return jax.shard_map(local, mesh=plan.mesh, in_specs=(plan.q, plan.kv, plan.kv, plan.rows),
                         out_specs=(plan.q, plan.lse), check_vma=False)(q, k, v, segment_ids)


def _forward_rule(q, k, v, segment_ids, plan):
    o, lse = _forward(q, k, v, segment_ids, plan)
    return o, (q, k, v, segment_ids, o, lse)


def _backward_rule(plan, residuals, do):
    local = functools.partial(_backward_local, scale=plan.scale, num_devices=plan.num_devices)
    dq, dk, dv = jax.shard_map(local, mesh=plan.mesh,
                               in_specs=(plan.q, plan.kv, plan.kv, plan.rows, plan.q, plan.lse, plan.q),
                               out_specs=(plan.q, plan.kv, plan.kv), check_vma=False)(*residuals, do)
    return dq, dk, dv, None


_ring_attention.defvjp(_forward_rule, _backward_rule)


def _ring(num_devices, step, local, blocks, accumulators):
    """Run `step(local, blocks, accumulators, src) -> (local, accumulators)` on the key/value blocks
    of every source device src in turn (own first), passing `blocks` and their `accumulators` one
    hop along the ring (d -> d + 1) per step. Returns `local` and the accumulators back home."""
    me = jax.lax.axis_index(SEQ_AXIS)
    perm = [(i, (i + 1) % num_devices) for i in range(num_devices)]

    def send(tree):
        return jax.tree.map(lambda x: jax.lax.ppermute(x, SEQ_AXIS, perm), tree)

    def body(s, carry):
        local, blocks, accumulators = carry
        incoming = send(blocks)                    # issued before the compute that it can overlap
        local, accumulators = step(local, blocks, accumulators, (me - s) % num_devices)
        return local, incoming, send(accumulators)

    local, blocks, accumulators = jax.lax.fori_loop(0, num_devices - 1, body, (local, blocks, accumulators))
    local, accumulators = step(local, blocks, accumulators, (me + 1) % num_devices)
    return local, send(accumulators)   # the P-th hop brings each block's accumulators to its owner


def _case(src):
    """0: own block (causal square), 1: src < d (first key chunk), 2: src > d (second query chunk)."""
    me = jax.lax.axis_index(SEQ_AXIS)
    return jnp.where(src == me, 0, jnp.where(src < me, 1, 2))


def _allowed(seg_q_bxQ, seg_k_bxK, causal_QxK=None):
    allowed = seg_q_bxQ[:, :, None] == seg_k_bxK[:, None, :]
    return allowed if causal_QxK is None else allowed & causal_QxK


def _scores(q_bxQxGxMxD, k_bxKxGxD, allowed_bxQxK, scale):
    s = jnp.einsum("bqgmd,bkgd->bgmqk", q_bxQxGxMxD, k_bxKxGxD, preferred_element_type=F32) * scale
    return jnp.where(allowed_bxQxK[:, None, None], s, -jnp.inf)


def _put(x, axis, part, new, *, add=False):
    """x with its rows `part` (a slice) along `axis` replaced by `new`, or increased by it.

    A static-slice `x.at[...].set` lowers to a scatter whose empty index arrays jax 0.11 hoists
    into the shard_map as zero-sized operands, and XLA:CPU's SPMD partitioner then crashes
    (segfault); dynamic_update_slice has no index arrays."""
    start = part.start or 0
    if add:
        new = jax.lax.slice_in_dim(x, start, start + new.shape[axis], axis=axis) + new
    return jax.lax.dynamic_update_slice_in_dim(x, new.astype(x.dtype), start, axis)


def _square_cases(c, causal_LxL):
    """(query rows, key rows, causal mask or None) of the three cases of `_case`."""
    return ((slice(None), slice(None), causal_LxL), (slice(None), slice(0, c), None),
            (slice(c, None), slice(None), None))


def _forward_local(q, k, v, seg, *, scale, num_devices):
    b, L, H, D = q.shape
    G = k.shape[2]
    q = q.reshape(b, L, G, H // G, D)
    pos_L = local_positions(L, num_devices)
    cases = _square_cases(L // 2, pos_L[:, None] >= pos_L[None, :])

    def fold(state, k, v, seg_k, *, rows, cols, causal):
        m, l, acc = (x[:, :, :, rows] for x in state)     # [b, G, M, Q] (acc [..., D])
        s = _scores(q[:, rows], k[:, cols], _allowed(seg[:, rows], seg_k[:, cols], causal), scale)
        m_new = jnp.maximum(m, s.max(-1))                  # finite: every query sees itself first
        p = jnp.exp(s - m_new[..., None])
        alpha = jnp.exp(m - m_new)
        l = alpha * l + p.sum(-1)
        acc = alpha[..., None] * acc + jnp.einsum("bgmqk,bkgd->bgmqd", p.astype(v.dtype), v[:, cols],
                                                  preferred_element_type=F32)
        return tuple(_put(x, 3, rows, new) for x, new in zip(state, (m_new, l, acc)))

    def step(state, blocks, accumulators, src):
        branches = [functools.partial(fold, rows=r, cols=c, causal=m) for r, c, m in cases]
        return jax.lax.switch(_case(src), branches, state, *blocks), accumulators

    M = H // G
    state = (jnp.full((b, G, M, L), -jnp.inf, F32), jnp.zeros((b, G, M, L), F32), jnp.zeros((b, G, M, L, D), F32))
    (m, l, acc), _ = _ring(num_devices, step, state, (k, v, seg), ())
    o = (acc / l[..., None]).transpose(0, 3, 1, 2, 4).reshape(b, L, H, D).astype(q.dtype)
    lse = (m + jnp.log(l)).transpose(0, 3, 1, 2).reshape(b, L, H)
    return o, lse


def _backward_local(q, k, v, seg, o, lse, do, *, scale, num_devices):
    b, L, H, D = q.shape
    G = k.shape[2]
    M = H // G
    q, o, do = (x.reshape(b, L, G, M, D) for x in (q, o, do))
    lse = lse.reshape(b, L, G, M).transpose(0, 2, 3, 1)                                     # [b, G, M, L]
    delta = jnp.einsum("bqgmd,bqgmd->bgmq", do.astype(F32), o.astype(F32))                  # rowsum(do * o)
    pos_L = local_positions(L, num_devices)
    cases = _square_cases(L // 2, pos_L[:, None] >= pos_L[None, :])

    def grads(dq, dkv, k, v, seg_k, *, rows, cols, causal):
        s = _scores(q[:, rows], k[:, cols], _allowed(seg[:, rows], seg_k[:, cols], causal), scale)
        p = jnp.exp(s - lse[:, :, :, rows, None])                                           # masked: 0
        dp = jnp.einsum("bqgmd,bkgd->bgmqk", do[:, rows], v[:, cols], preferred_element_type=F32)
        ds = p * (dp - delta[:, :, :, rows, None]) * scale
        dq = _put(dq, 1, rows, jnp.einsum("bgmqk,bkgd->bqgmd", ds.astype(k.dtype), k[:, cols],
                                          preferred_element_type=F32), add=True)
        dk = jnp.einsum("bgmqk,bqgmd->bkgd", ds.astype(q.dtype), q[:, rows], preferred_element_type=F32)
        dv = jnp.einsum("bgmqk,bqgmd->bkgd", p.astype(do.dtype), do[:, rows], preferred_element_type=F32)
        return dq, (_put(dkv[0], 1, cols, dk, add=True), _put(dkv[1], 1, cols, dv, add=True))

    def step(dq, blocks, dkv, src):
        branches = [functools.partial(grads, rows=r, cols=c, causal=m) for r, c, m in cases]
        return jax.lax.switch(_case(src), branches, dq, dkv, *blocks)

    zeros = jnp.zeros(k.shape, F32)
    dq, (dk, dv) = _ring(num_devices, step, jnp.zeros(q.shape, F32), (k, v, seg), (zeros, zeros))
    return dq.reshape(b, L, H, D).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)
