"""Megablox grouped matmul kernels for TPU (`jax.experimental.pallas.ops.tpu.megablox`):
`gmm` for the forward and dlhs (`transpose_rhs=True`), `tgmm` for drhs, joined by a custom_vjp.
Off a TPU the kernels run in Pallas's TPU interpret mode (`pltpu.InterpretParams()`: TPU
semantics on CPU, slow; for tests).

Tiles (tm, tk, tn): tm = 128 rows, or M rounded up to a multiple of 16 when smaller; lhs is
padded with zero rows to a multiple of tm (those rows are after the last group, so they give 0).
tk and tn are the largest of 512, 256, 128 that divides K (N), or the whole dimension when
neither is a multiple of 128 and it is at most 2048. Other shapes, and dtypes other than float32
and bfloat16, raise NotImplementedError (the next implementation is tried). Megablox leaves the
rows after the last group unwritten; they are set to 0 here.
"""

import functools
import importlib

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from hybrax.pallas_kernels.implementation import interpret_mode

# the megablox package exports the function `gmm` under the module's own name
megablox = importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def _tile(size: int, name: str) -> int:
    for t in (512, 256, 128):
        if size % t == 0:
            return t
    if size <= 2048:
        return size
    raise NotImplementedError(f"pallas_tpu: {name}={size} is neither a multiple of 128 nor <= 2048")


def _interpret():
    return pltpu.InterpretParams() if interpret_mode("pallas_tpu grouped_matmul", "tpu") else False


def _pad_rows(x, rows: int):
    return jnp.pad(x, ((0, rows - x.shape[0]), (0, 0)))


def _rows_in_groups(out, group_sizes):
    """The first M rows of a padded kernel output, rows after the last group set to 0."""
    return jnp.where(jnp.arange(out.shape[0])[:, None] < jnp.sum(group_sizes), out, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gmm(lhs, rhs, group_sizes, tiling, out_dtype):
    M, tm = lhs.shape[0], tiling[0]
    out = megablox.gmm(_pad_rows(lhs, -(-M // tm) * tm), rhs, group_sizes, out_dtype, tiling,
                       interpret=_interpret())
    return _rows_in_groups(out[:M], group_sizes)


def _gmm_fwd(lhs, rhs, group_sizes, tiling, out_dtype):
    return _gmm(lhs, rhs, group_sizes, tiling, out_dtype), (lhs, rhs, group_sizes)


def _gmm_bwd(tiling, out_dtype, residuals, dout):
    lhs, rhs, group_sizes = residuals
    M, tm = lhs.shape[0], tiling[0]
    rows = -(-M // tm) * tm
    dout = _pad_rows(dout, rows)
    dlhs = megablox.gmm(dout, rhs, group_sizes, lhs.dtype, tiling, transpose_rhs=True, interpret=_interpret())
    drhs = megablox.tgmm(_pad_rows(lhs, rows).swapaxes(0, 1), dout, group_sizes, rhs.dtype, tiling,
                         interpret=_interpret())
    return _rows_in_groups(dlhs[:M], group_sizes), drhs, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def grouped_matmul(lhs, rhs, group_sizes, *, preferred_element_type):
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    for name, dtype in (("lhs", lhs.dtype), ("rhs", rhs.dtype), ("output", out_dtype)):
        if dtype not in SUPPORTED_DTYPES:
            raise NotImplementedError(f"pallas_tpu: {name} dtype {dtype} is not float32 or bfloat16")
    M, K = lhs.shape
    if M == 0:
        return jnp.zeros((0, rhs.shape[2]), out_dtype)
    tiling = (min(128, -(-M // 16) * 16), _tile(K, "K"), _tile(rhs.shape[2], "N"))
    return _gmm(lhs, rhs, group_sizes, tiling, out_dtype)
