"""Glue shared by the Pallas mLSTM kernels (tpu.py, gpu.py): layout, gates, the exact final m.

The kernels see one head at a time in `[B, H, Tp, D]` layout, `Tp` the sequence padded to a multiple
of the chunk `L` with q = k = v = 0, li = lf = 0 (padding tokens are masked out of every sum and max
in the kernels, and lf = 0 leaves the state unchanged). Per-token gates travel as rows `[B, H, NC,
L]`; segments as reset counts (same count <=> same segment) and an `in` flag (1 while token t is
still in the segment that was active when its chunk started: the carried state reaches it).

Stabilisers: the kernels, forward and backward, treat every stabiliser m as a constant (h does not
depend on it; xLSTM's kernels do the same). The state they return, (C, n) stabilised by the final
m, then has the derivative of C_raw exp(-m) at fixed m. As in xla.py, the final m is computed here
again, differentiably (`final_m`, an associative scan of the max-plus recurrence with the tie going
to the newer term), and the m-dependence restored as C exp(sg(m) - m); its value is the kernel's.
Likewise the initial state enters the kernel as C_0 exp(m_0 - sg(m_0)) with m_0 held fixed.
"""

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

F32 = jnp.float32
_sg = jax.lax.stop_gradient


@dataclasses.dataclass(frozen=True)
class Layout:
    batch: int
    seq_len: int
    heads: int
    key_dim: int
    value_dim: int
    chunk: int
    padded_len: int
    has_segments: bool

    @property
    def num_chunks(self) -> int:
        return self.padded_len // self.chunk


def make_layout(q, v, segment_ids, chunk: int) -> Layout:
    batch, seq_len, heads, key_dim = q.shape
    padded_len = -(-seq_len // chunk) * chunk
    return Layout(batch, seq_len, heads, key_dim, v.shape[-1], chunk, padded_len, segment_ids is not None)


def check_supported(kernel: str, q, k, v) -> None:
    """NotImplementedError for inputs the kernels do not take (the next implementation runs)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in (jnp.float32, jnp.bfloat16):
            raise NotImplementedError(f"{kernel} takes float32 or bfloat16 q, k, v; {name} is {x.dtype}")
    if q.shape[1] == 0:
        raise NotImplementedError(f"{kernel} needs T >= 1")


def to_heads(x_BxTxHxD, layout: Layout):
    """[B, T, H, D] -> [B, H, Tp, D], zero padded."""
    x = jnp.transpose(x_BxTxHxD, (0, 2, 1, 3))
    return jnp.pad(x, ((0, 0), (0, 0), (0, layout.padded_len - layout.seq_len), (0, 0)))


def from_heads(x_BxHxTpxD, layout: Layout):
    """[B, H, Tp, D] -> [B, T, H, D]."""
    return jnp.transpose(x_BxHxTpxD[:, :, :layout.seq_len], (0, 2, 1, 3))


def gate_rows(gate_BxTxH, layout: Layout):
    """[B, T, H] -> [B, H, NC, L] float32 (zero padded)."""
    return to_heads(gate_BxTxH.astype(F32)[..., None], layout).reshape(
        layout.batch, layout.heads, layout.num_chunks, layout.chunk)


def from_gate_rows(rows_BxHxNCxL, layout: Layout):
    """[B, H, NC, L] -> [B, T, H], the inverse of gate_rows."""
    return from_heads(rows_BxHxNCxL.reshape(layout.batch, layout.heads, layout.padded_len, 1), layout)[..., 0]


def segment_rows(segment_ids_BxT, layout: Layout):
    """(reset count, in flag) as float32 rows [B, 1, NC, L], or () without segments."""
    if segment_ids_BxT is None:
        return ()
    seg = jnp.pad(segment_ids_BxT.astype(jnp.int32), ((0, 0), (0, layout.padded_len - layout.seq_len)),
                  mode="edge")
    starts = jnp.concatenate([jnp.zeros_like(seg[:, :1]), (seg[:, 1:] != seg[:, :-1]).astype(jnp.int32)], axis=1)
    count = jnp.cumsum(starts, axis=1).reshape(layout.batch, layout.num_chunks, layout.chunk)
    before = jnp.concatenate([count[:, :1, :1], count[:, :-1, -1:]], axis=1)  # the token before each chunk
    in_flag = (count == before).astype(F32)
    return count.astype(F32)[:, None], in_flag[:, None]


def _newer_max(old, new):
    """max(old, new), the gradient going to `new` at a tie (the reference's rule)."""
    return jnp.where(new >= old, new, old)


def final_m(li_BxTxH, lf_BxTxH, m0_BxH, segment_ids_BxT):
    """The final stabiliser m_T of the recurrence m_t = max(lf_t + m_{t-1}, li_t) (m = 0 entering a
    segment start), differentiably: an associative scan of the maps x -> max(x + a, c)."""
    li, lf = li_BxTxH.astype(F32), lf_BxTxH.astype(F32)
    if segment_ids_BxT is None:
        reset = jnp.zeros(li.shape, bool)
    else:
        starts = jnp.concatenate([jnp.zeros_like(segment_ids_BxT[:, :1], bool),
                                  segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]], axis=1)
        reset = jnp.broadcast_to(starts[..., None], li.shape)
    c = jnp.where(reset, _newer_max(lf, li), li)  # at a reset the zero state (m = 0) enters: lf + 0

    def combine(first, second):
        a1, c1, keep1 = first
        a2, c2, keep2 = second
        return a1 + a2, jnp.where(keep2, _newer_max(c1 + a2, c2), c2), keep1 & keep2

    a, c, keep = jax.lax.associative_scan(combine, (lf, c, ~reset), axis=1)
    a, c, keep = a[:, -1], c[:, -1], keep[:, -1]
    m0 = jnp.zeros(a.shape, F32) if m0_BxH is None else m0_BxH.astype(F32)
    return jnp.where(keep, _newer_max(m0 + a, c), c)


def enter_state(initial_state):
    """(C_0, n_0, m_0) float32 with m_0 held fixed and the raw memory's m-dependence kept in C, n."""
    if initial_state is None:
        return None
    c0, n0, m0 = (x.astype(F32) for x in initial_state)
    rescale = jnp.exp(m0 - _sg(m0))
    return c0 * rescale[..., None, None], n0 * rescale[..., None], _sg(m0)


def leave_state(c, n, m_kernel, m_exact):
    """The final state: values of the kernel, the derivative of the raw memory through m_exact."""
    rescale = jnp.exp(_sg(m_exact) - m_exact)
    return c * rescale[..., None, None], n * rescale[..., None], m_kernel + (m_exact - _sg(m_exact))


def with_own_backward(forward: Callable, load_backward: Callable[[], Callable], with_output: bool = False) -> Callable:
    """The kernel call `(config, q, k, v, li, lf, state0, seg) -> (h, C, n, m)` as a `jax.custom_vjp`
    whose backward runs the backward kernels; every stabiliser is a constant to it (m gets no
    cotangent). `forward(..., save_states)` also returns, with save_states, the states (C, n, m)
    entering every chunk; `load_backward()` returns `backward(config, q, k, v, li, lf, seg, states,
    dh, dC, dn) -> (dq, dk, dv, dli, dlf, dC0, dn0)`; with_output, it also takes h after dn (the
    residuals then keep it)."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def chunked(config, q, k, v, li, lf, state0, seg):
        return tuple(forward(config, q, k, v, li, lf, state0, seg, save_states=False))

    def chunked_fwd(config, q, k, v, li, lf, state0, seg):
        h, c, n, m, states = forward(config, q, k, v, li, lf, state0, seg, save_states=True)
        return (h, c, n, m), (q, k, v, li, lf, state0, seg, states, h if with_output else None)

    def chunked_bwd(config, residuals, cotangents):
        q, k, v, li, lf, state0, seg, states, h = residuals
        dh, dc, dn, _ = cotangents  # the kernel's m is a constant: its gradient is restored outside
        extra = (h,) if with_output else ()
        dq, dk, dv, dli, dlf, dc0, dn0 = load_backward()(config, q, k, v, li, lf, seg, states, dh, dc, dn, *extra)
        dstate0 = None if state0 is None else (dc0, dn0.reshape(state0[1].shape), jnp.zeros_like(state0[2]))
        return dq, dk, dv, dli, dlf, dstate0, tuple(None for _ in seg)

    chunked.defvjp(chunked_fwd, chunked_bwd)
    return chunked
