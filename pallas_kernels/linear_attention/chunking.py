"""Layout glue shared by the Pallas linear-attention kernels (tpu.py, gpu.py).

The kernels see one head at a time in `[B, H, Tp, D]` layout, with `Tp` the sequence padded to a
multiple of the chunk size `C`. Everything that is cheap and elementwise is done here in plain jnp,
outside the kernels, and differentiated by JAX:

- the decay becomes the within-chunk inclusive cumulative sum `b_t = sum_{s in chunk, s <= t} g_s`
  (`[B, H, Tp, G]`, `G = 1` for no / scalar decay, `G = K` for per-channel gates). All kernel
  weights are `exp(b_t - b_s)` with `s <= t`, `exp(b_t)` or `exp(b_C - b_t)`: exponents <= 0.
- segment ids become `reset counts` `r_t` (number of segment starts up to t; same segment <=>
  same count), and two per-token flags: `in_t = 1` while token t is still in the segment that was
  active when its chunk started (it sees the carried state), `out_t = 1` for tokens in the segment
  of the chunk's last token (they enter the carried state).

Padding appends tokens with q = k = v = 0, g = 0 and the last segment id: they change neither the
outputs of real tokens nor the state.
"""

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Layout:
    batch: int
    seq_len: int
    heads: int
    key_dim: int
    value_dim: int
    chunk: int
    padded_len: int
    decay_dim: int  # 1 (none or scalar per head) or key_dim (per channel)
    per_channel: bool
    has_segments: bool
    has_decay: bool

    @property
    def num_chunks(self) -> int:
        return self.padded_len // self.chunk


def make_layout(q, v, log_decay, segment_ids, chunk_size: int) -> Layout:
    batch, seq_len, heads, key_dim = q.shape
    padded_len = -(-seq_len // chunk_size) * chunk_size
    per_channel = log_decay is not None and log_decay.ndim == 4
    return Layout(batch, seq_len, heads, key_dim, v.shape[-1], chunk_size, padded_len,
                  key_dim if per_channel else 1, per_channel, segment_ids is not None,
                  log_decay is not None)


def to_heads(x_BxTxHxD, layout: Layout):
    """[B, T, H, D] -> [B, H, Tp, D], zero padded."""
    x = jnp.transpose(x_BxTxHxD, (0, 2, 1, 3))
    return jnp.pad(x, ((0, 0), (0, 0), (0, layout.padded_len - layout.seq_len), (0, 0)))


def from_heads(x_BxHxTpxD, layout: Layout):
    """[B, H, Tp, D] -> [B, T, H, D]."""
    return jnp.transpose(x_BxHxTpxD[:, :, :layout.seq_len], (0, 2, 1, 3))


def chunk_cumulative_decay(log_decay, layout: Layout):
    """g ([B, T, H] / [B, T, H, K] / None) -> b [B, H, Tp, G] float32, cumsum within each chunk."""
    if log_decay is None:
        return jnp.zeros((layout.batch, layout.heads, layout.padded_len, 1), jnp.float32)
    g = log_decay.astype(jnp.float32)
    g = g[..., None] if g.ndim == 3 else g
    g = to_heads(g, layout)
    g = g.reshape(layout.batch, layout.heads, layout.num_chunks, layout.chunk, layout.decay_dim)
    b = jnp.cumsum(g, axis=3)
    return b.reshape(layout.batch, layout.heads, layout.padded_len, layout.decay_dim)


def row_form(x_BxHxTpx1, layout: Layout):
    """[B, H, Tp, 1] -> [B, H, NC, 1, C]: the same values laid out along lanes, per chunk."""
    return x_BxHxTpx1.reshape(x_BxHxTpx1.shape[0], x_BxHxTpx1.shape[1], layout.num_chunks, 1,
                              layout.chunk)


def rows(x_BxHxTpx1, layout: Layout):
    """[B, H, Tp, 1] -> [B, H, NC, C]: per-token scalars as one row per chunk (no lane padding)."""
    return x_BxHxTpx1.reshape(x_BxHxTpx1.shape[0], x_BxHxTpx1.shape[1], layout.num_chunks, layout.chunk)


def segment_flags(segment_ids_BxT, layout: Layout):
    """-> (reset_count [B, 1, Tp, 1] int32, in_flag [B, 1, Tp, 1] f32, out_flag [B, 1, Tp, 1] f32)."""
    seg = segment_ids_BxT.astype(jnp.int32)
    seg = jnp.pad(seg, ((0, 0), (0, layout.padded_len - layout.seq_len)), mode="edge")
    starts = jnp.concatenate([jnp.zeros_like(seg[:, :1]), (seg[:, 1:] != seg[:, :-1]).astype(jnp.int32)],
                             axis=1)
    count = jnp.cumsum(starts, axis=1)
    count_NCxC = count.reshape(layout.batch, layout.num_chunks, layout.chunk)
    # Count of the token just before each chunk (the first chunk starts in segment 0).
    before = jnp.concatenate([count_NCxC[:, :1, :1], count_NCxC[:, :-1, -1:]], axis=1)
    in_flag = (count_NCxC == before).astype(jnp.float32).reshape(layout.batch, -1)
    out_flag = (count_NCxC == count_NCxC[:, :, -1:]).astype(jnp.float32).reshape(layout.batch, -1)
    as_column = lambda x: x[:, None, :, None]
    return as_column(count), as_column(in_flag), as_column(out_flag)


def forward_outputs(layout: Layout, dtype, save_states: bool, state_dims: tuple[int, int],
                    states_dtype=jnp.float32) -> list[jax.ShapeDtypeStruct]:
    """out_shape of a chunk-walking forward kernel: o [B, H, Tp, V] in `dtype`, the final state
    [B, H, *state_dims] float32 and, when save_states, the state entering every chunk
    [B, H, NC, *state_dims] in `states_dtype` (the backward's residual)."""
    bh = (layout.batch, layout.heads)
    out = [jax.ShapeDtypeStruct((*bh, layout.padded_len, layout.value_dim), dtype),
           jax.ShapeDtypeStruct((*bh, *state_dims), jnp.float32)]
    if save_states:
        out.append(jax.ShapeDtypeStruct((*bh, layout.num_chunks, *state_dims), states_dtype))
    return out


def with_own_backward(forward: Callable, load_backward: Callable[[], Callable]) -> Callable:
    """The kernel call `(config, q, k, v, b, s0, seg) -> (o, final)` as a `jax.custom_vjp` whose
    backward runs backward kernels, not autodiff through the forward.

    `forward(config, q, k, v, b, s0, seg, save_states)` returns (o, final) and, with save_states,
    the per-chunk states the backward walks in reverse. `load_backward()` returns
    `backward(config, q, k, v, b, seg, states, d_o, d_final) -> (dq, dk, dv, db, ds0)`; it is
    imported at the first backward because the backward module imports the forward's."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def chunked(config, q, k, v, b, s0, seg):
        return tuple(forward(config, q, k, v, b, s0, seg, save_states=False))

    def chunked_fwd(config, q, k, v, b, s0, seg):
        o, final, states = forward(config, q, k, v, b, s0, seg, save_states=True)
        return (o, final), (q, k, v, b, s0, seg, states)

    def chunked_bwd(config, residuals, cotangents):
        q, k, v, b, s0, seg, states = residuals
        dq, dk, dv, db, ds0 = load_backward()(config, q, k, v, b, seg, states, *cotangents)
        return dq, dk, dv, db, (ds0 if s0 is not None else None), tuple(None for _ in seg)

    chunked.defvjp(chunked_fwd, chunked_bwd)
    return chunked
