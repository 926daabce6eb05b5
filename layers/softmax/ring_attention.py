"""Ring attention: causal softmax attention with the sequence split over the mesh axis `seq`
(Liu et al., 2023, "Ring Attention with Blockwise Transformers"; zigzag load balancing as in
zhuzilin/ring-flash-attention and Llama 3's context parallelism).

Every device keeps its T/P local queries, in the zigzag order of `layout` (chunks d and 2P-1-d of
c = T/(2P) tokens). The key/value blocks (with their segment ids) travel around the ring with
`ppermute` over `seq`, one hop per step, P steps. Each step attends the local queries to one block,
giving the block's output and log-sum-exp, and an online softmax (float32) merges it into the
local output:

    s = scale q k^T (masked),  lse_blk = logsumexp_k s,  o_blk = exp(s - lse_blk) v
    lse' = logaddexp(lse, lse_blk),  o' = exp(lse - lse') o + exp(lse_blk - lse') o_blk

Which keys a query sees is the rule of `pallas_kernels.dot_product_attention` with causal=True:
natural position of the key <= natural position of the query AND same segment. With zigzag chunks
the causal part is known per block, so every step does half a square of work, not a full one:

    own block (src == d):  the 2c x 2c square under the causal mask (chunk pair (d, 2P-1-d) is masked)
    src < d:               all 2c queries see the first key chunk (src) fully, the second (2P-1-src) not at all
    src > d:               only the second query chunk (2P-1-d) sees keys, and it sees both key chunks

(`jax.lax.switch` on the source device picks the case; the fully-future half is never computed.)
A device's rows are in increasing natural position, so the own block's causal mask is the lower
triangle of the 2c x 2c square. Every device computes 2P + 2 chunk-pair products (2P + 1 needed),
the same on every device. Since the case fixes the causal part, blocks travel with their segment
ids only.

Gradients: a `jax.custom_vjp` whose backward is a second ring. Differentiating the forward loop
directly would save every step's [2c, 2c] probabilities (O(T * T/P) per device) or, with remat,
still gather them per step; instead the residuals are only the local q, k, v, output and
log-sum-exp (O(T/P) per device), and the backward recomputes each block's probabilities
p = exp(s - lse) from the GLOBAL lse, ds = p * (do v^T - rowsum(do * o)), keeps dq local and sends
each key/value block around the ring together with its dk, dv accumulators; after P hops the
accumulators are home. Forward: P - 1 hops of (k, v, segment ids); backward: P - 1 hops of
(k, v, segment ids) and P of (dk, dv). The next key/value block is sent before the current one is
used, so a hop can overlap the compute. Nothing ever gathers the full sequence.

The per-step block is pluggable (op "ring_attention_block" of `pallas_kernels.implementation`, so
the run's kernel log says which ran): `attend(q, k, v, seg_q, seg_k, *, causal, scale) ->
(o_blk, lse_blk)` and `grads(q, k, v, seg_q, seg_k, lse, do, delta, *, causal, scale) ->
(dq, dk, dv)` of the block, heads-major ([b, h, rows, D]), given the global lse and
delta = rowsum(do * o).
- `xla`: the jnp block below; it materialises the step's [2c, 2c] scores per head.
- `splash`: jax's fused splash kernels (`ring_block_splash.py`), O(c) memory per head; TPU, or TPU
  interpret mode on a CPU when forced; refuses c not a multiple of 128.
`implementation` takes the values of `dot_product_attention`'s: None/"auto" runs the defaults
(splash then xla on a TPU, xla elsewhere) that pallas_kernels/verified.py lists for the backend,
today xla only (the splash block has run in TPU interpret mode, not on a TPU); "xla" and "reference" run xla; "splash" runs splash (on a CPU
in interpret mode); "cudnn" and "pallas_gpu" have no ring block and run xla. Whatever was asked,
xla is the last resort, and a refusal is logged (an error under `kernel_policy(strict=True)`).

Memory per device: the residuals and the travelling blocks are O(T/P); with the xla block each
step's scores are one [2c, 2c] square (or a half of it) per head; with splash, O(T/P) as well.
"""

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from hybrax.layers.sequence_parallel.layout import SEQ_AXIS, check_length, seq_size
from hybrax.layers.sharding import current_mesh, spec
from hybrax.pallas_kernels.dot_product_attention.api import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from hybrax.pallas_kernels.dot_product_attention.mask import check_inputs
from hybrax.pallas_kernels.implementation import AUTO, dispatch, lazy_backend

F32 = jnp.float32
BLOCK_OP = "ring_attention_block"


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static description of one call: softmax scale, ring size, block functions, mesh and specs."""

    scale: float
    num_devices: int
    attend: Callable       # the block's (o_blk, lse_blk)
    grads: Callable        # the block's (dq, dk, dv)
    mesh: object
    q: PartitionSpec       # [B, T, H, D]
    kv: PartitionSpec      # [B, T, Hkv, D]
    rows: PartitionSpec    # [B, T]
    lse: PartitionSpec     # [B, T, H]


def ring_attention(q_BxTxHxD: jax.Array, k_BxTxGxD: jax.Array, v_BxTxGxD: jax.Array, *,
                   segment_ids: jax.Array | None = None, scale: float | None = None,
                   implementation: str | Sequence[str] | None = None) -> jax.Array:
    """Causal softmax attention over a sequence split on `seq`, in zigzag order: o [B, T, H, D].

    q [B, T, H, D], k and v [B, T, Hkv, D] (H a multiple of Hkv), segment_ids int [B, T] (None: one
    segment), all in stored (zigzag) order, inside `jax.set_mesh`. Equal to
    `dot_product_attention(causal=True, segment_ids=...)` on the natural order. `implementation`:
    the per-step block, named as for `dot_product_attention` (see the module docstring)."""
    check_inputs(q_BxTxHxD, k_BxTxGxD, v_BxTxGxD, segment_ids, None)
    B, T, H, D = q_BxTxHxD.shape
    num_devices = seq_size()
    check_length(T, num_devices)
    if segment_ids is None:
        segment_ids = jnp.zeros((B, T), jnp.int32)
    attend, grads = ring_block(T // (2 * num_devices), implementation)
    q_spec = spec(("batch", "length", "heads", None), q_BxTxHxD.shape)
    kv_spec = spec(("batch", "length", "kv_heads", None), k_BxTxGxD.shape)
    if q_spec[2] != kv_spec[2]:   # heads and kv_heads must split alike to keep each group on one device
        q_spec, kv_spec = (PartitionSpec(*s[:2], None, None) for s in (q_spec, kv_spec))
    plan = _Plan(scale=D ** -0.5 if scale is None else float(scale), num_devices=num_devices, attend=attend,
                 grads=grads, mesh=current_mesh(), q=q_spec, kv=kv_spec, rows=PartitionSpec(*q_spec[:2]),
                 lse=PartitionSpec(*q_spec[:3]))
    return _ring_attention(q_BxTxHxD, k_BxTxGxD, v_BxTxGxD, segment_ids, plan)


# ---- the per-step block -------------------------------------------------------------------------

def _visible(seg_q_bxQ, seg_k_bxK, causal):
    """[b, Q, K]: same segment and, in the own block, key row <= query row."""
    visible = seg_q_bxQ[:, :, None] == seg_k_bxK[:, None, :]
    if causal:
        Q, K = visible.shape[1:]
        visible &= jnp.arange(Q)[:, None] >= jnp.arange(K)[None, :]
    return visible


def _scores(q_bxHxQxD, k_bxGxKxD, seg_q, seg_k, causal, scale):
    b, H, Q, D = q_bxHxQxD.shape
    G = k_bxGxKxD.shape[1]
    q_bxGxMxQxD = q_bxHxQxD.reshape(b, G, H // G, Q, D)
    s = jnp.einsum("bgmqd,bgkd->bgmqk", q_bxGxMxQxD, k_bxGxKxD, preferred_element_type=F32) * scale
    return jnp.where(_visible(seg_q, seg_k, causal)[:, None, None], s, -jnp.inf)


def jnp_attend(q, k, v, seg_q, seg_k, *, causal, scale):
    """The xla block: (o_blk [b, H, Q, D], lse_blk [b, H, Q]) in float32, lse_blk = -inf (and o_blk
    = 0) for a query that sees no key of the block."""
    b, H, Q, D = q.shape
    s = _scores(q, k, seg_q, seg_k, causal, scale)                    # [b, G, M, Q, K]
    m = s.max(-1)
    m = jnp.where(m > -jnp.inf, m, 0.0)
    p = jnp.exp(s - m[..., None])
    l = p.sum(-1)
    o = jnp.einsum("bgmqk,bgkd->bgmqd", p.astype(v.dtype), v, preferred_element_type=F32)
    o = o / jnp.where(l > 0, l, 1.0)[..., None]
    return o.reshape(b, H, Q, D), (m + jnp.log(l)).reshape(b, H, Q)


def jnp_grads(q, k, v, seg_q, seg_k, lse, do, delta, *, causal, scale):
    """The xla block's share (dq [b, H, Q, D], dk, dv [b, G, K, D], float32) of the gradients, from
    the global lse and delta = rowsum(do * o) [b, H, Q]."""
    b, H, Q, D = q.shape
    G = k.shape[1]
    q5, do5 = (x.reshape(b, G, H // G, Q, D) for x in (q, do))
    lse, delta = (x.reshape(b, G, H // G, Q, 1) for x in (lse, delta))
    p = jnp.exp(_scores(q, k, seg_q, seg_k, causal, scale) - lse)                          # masked: 0
    dp = jnp.einsum("bgmqd,bgkd->bgmqk", do5, v, preferred_element_type=F32)
    ds = p * (dp - delta) * scale
    dq = jnp.einsum("bgmqk,bgkd->bgmqd", ds.astype(k.dtype), k, preferred_element_type=F32)
    dk = jnp.einsum("bgmqk,bgmqd->bgkd", ds.astype(q.dtype), q5, preferred_element_type=F32)
    dv = jnp.einsum("bgmqk,bgmqd->bgkd", p.astype(do.dtype), do5, preferred_element_type=F32)
    return dq.reshape(b, H, Q, D), dk, dv


BLOCKS = {
    "xla": lambda chunk: (jnp_attend, jnp_grads),
    "splash": lazy_backend("hybrax.layers.softmax", "ring_block_splash", "splash_block"),
}
_BLOCK_OF = {"reference": "xla", "xla": "xla", "splash": "splash", "cudnn": None, "pallas_gpu": None}


def ring_block(chunk: int, implementation: str | Sequence[str] | None = None) -> tuple[Callable, Callable]:
    """(attend, grads) of the first block implementation that accepts chunk length `chunk`
    (`implementation` named as for dot_product_attention; see the module docstring)."""
    if implementation is None or implementation == AUTO:   # the defaults verified on this backend (verified.py)
        return dispatch(BLOCK_OP, BLOCKS, {"tpu": ("splash", "xla"), "default": ("xla",)}, None, chunk)
    else:
        asked = [implementation] if isinstance(implementation, str) else list(implementation)
        for name in asked:
            if name not in ATTENTION_IMPLEMENTATIONS:
                raise ValueError(f"ring_attention: implementation={name!r} is unknown; valid: 'auto' or "
                                 f"{sorted(ATTENTION_IMPLEMENTATIONS)}")
        names = list(dict.fromkeys([_BLOCK_OF[n] for n in asked if _BLOCK_OF[n]] + ["xla"]))
    return dispatch(BLOCK_OP, BLOCKS, {"default": ("xla",)}, names, chunk)


# ---- the ring -----------------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _ring_attention(q, k, v, segment_ids, plan):
    return _forward(q, k, v, segment_ids, plan)[0]


def _forward(q, k, v, segment_ids, plan):
    local = functools.partial(_forward_local, plan=plan)
    return jax.shard_map(local, mesh=plan.mesh, in_specs=(plan.q, plan.kv, plan.kv, plan.rows),
                         out_specs=(plan.q, plan.lse), check_vma=False)(q, k, v, segment_ids)


def _forward_rule(q, k, v, segment_ids, plan):
    o, lse = _forward(q, k, v, segment_ids, plan)
    return o, (q, k, v, segment_ids, o, lse)


def _backward_rule(plan, residuals, do):
    local = functools.partial(_backward_local, plan=plan)
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


def _square_cases(c):
    """(query rows, key rows, causal) of the three cases of `_case`."""
    return (slice(None), slice(None), True), (slice(None), slice(0, c), False), (slice(c, None), slice(None), False)


def _put(x, axis, part, new, *, add=False):
    """x with its rows `part` (a slice) along `axis` replaced by `new`, or increased by it.

    A static-slice `x.at[...].set` lowers to a scatter whose empty index arrays jax 0.11 hoists
    into the shard_map as zero-sized operands, and XLA:CPU's SPMD partitioner then crashes
    (segfault); dynamic_update_slice has no index arrays."""
    start = part.start or 0
    if add:
        new = jax.lax.slice_in_dim(x, start, start + new.shape[axis], axis=axis) + new
    return jax.lax.dynamic_update_slice_in_dim(x, new.astype(x.dtype), start, axis)


def _heads_major(x):
    """[b, L, h, ...] -> [b, h, L, ...] (and back)."""
    return jnp.swapaxes(x, 1, 2)


def _forward_local(q, k, v, seg, *, plan):
    b, L, H, D = q.shape
    q, k, v = (_heads_major(x) for x in (q, k, v))                  # [b, H, L, D], [b, G, L, D]

    def fold(state, k, v, seg_k, *, rows, cols, causal):
        o_blk, lse_blk = plan.attend(q[:, :, rows], k[:, :, cols], v[:, :, cols], seg[:, rows], seg_k[:, cols],
                                     causal=causal, scale=plan.scale)
        o, lse = (x[:, :, rows] for x in state)
        lse_new = jnp.logaddexp(lse, lse_blk)      # finite: every query sees itself in the own block, first
        o_new = (jnp.exp(lse - lse_new)[..., None] * o
                 + jnp.exp(lse_blk - lse_new)[..., None] * o_blk.astype(F32))
        return _put(state[0], 2, rows, o_new), _put(state[1], 2, rows, lse_new)

    def step(state, blocks, accumulators, src):
        branches = [functools.partial(fold, rows=r, cols=c, causal=m) for r, c, m in _square_cases(L // 2)]
        return jax.lax.switch(_case(src), branches, state, *blocks), accumulators

    state = (jnp.zeros((b, H, L, D), F32), jnp.full((b, H, L), -jnp.inf, F32))
    (o, lse), _ = _ring(plan.num_devices, step, state, (k, v, seg), ())
    return _heads_major(o).astype(q.dtype), _heads_major(lse)


def _backward_local(q, k, v, seg, o, lse, do, *, plan):
    L = q.shape[1]
    dtypes = q.dtype, k.dtype, v.dtype
    q, k, v, o, do, lse = (_heads_major(x) for x in (q, k, v, o, do, lse))
    delta = jnp.einsum("bhqd,bhqd->bhq", do.astype(F32), o.astype(F32))                    # rowsum(do * o)

    def grads(dq, dkv, k, v, seg_k, *, rows, cols, causal):
        dq_blk, dk_blk, dv_blk = plan.grads(q[:, :, rows], k[:, :, cols], v[:, :, cols], seg[:, rows], seg_k[:, cols],
                                            lse[:, :, rows], do[:, :, rows], delta[:, :, rows], causal=causal,
                                            scale=plan.scale)
        return _put(dq, 2, rows, dq_blk, add=True), (_put(dkv[0], 2, cols, dk_blk, add=True),
                                                     _put(dkv[1], 2, cols, dv_blk, add=True))

    def step(dq, blocks, dkv, src):
        branches = [functools.partial(grads, rows=r, cols=c, causal=m) for r, c, m in _square_cases(L // 2)]
        return jax.lax.switch(_case(src), branches, dq, dkv, *blocks)

    zeros = jnp.zeros(k.shape, F32)
    dq, (dk, dv) = _ring(plan.num_devices, step, jnp.zeros(q.shape, F32), (k, v, seg), (zeros, zeros))
    return tuple(_heads_major(x).astype(t) for x, t in zip((dq, dk, dv), dtypes))
