"""Block-wise dynamic 8-bit quantization (Dettmers et al., 2022, "8-bit Optimizers via Block-wise
Quantization"), the storage of `adamw8bit`'s moments.

The dynamic map: 256 values in [-1, 1]. Value 10^e * f for exponents e = -6 .. 0 and a linear
fraction f in (0.1, 1) that gets 2^(e + 6) values per sign at exponent e (more resolution for the
large values of a block, and still some at a millionth of its largest): the sign bit, e's run of
zero bits, an indicator bit and the fraction bits of the paper's dynamic tree type, plus 0 and 1.
The unsigned map (for Adam's second moment, never negative) spends the sign bit on the fraction.

A tensor is cut into blocks of `block_size` consecutive elements (row-major), each stored as uint8
indices into the map and one float32 absmax: x ~ map[index] * absmax. Blocks are shaped, not flat,
so the codes keep the parameter's shape and sharding: a block is `run` consecutive entries of one
axis (`BlockLayout.axis`) times every axis after it, and the absmaxes have the shape of the axes up
to and including that one. When block_size is a multiple of the axes after the cut (the usual
case), blocks are exactly the paper's runs of block_size elements; when it is not (d_ff = 704 and
block_size 2048), a block is the largest whole number of those rows that fits (2 x 704). A ragged
last block along the cut axis is padded with zeros, which change no absmax.

`quantize_reference` / `dequantize_reference` are the same quantization in float64 numpy with a
brute-force nearest code: what the JAX path is tested against.
"""

import dataclasses
import math

import jax.numpy as jnp
import numpy as np


def dynamic_map(signed: bool) -> np.ndarray:
    """The paper's dynamic (tree) quantization map: 256 sorted float64 values, in [-1, 1] or [0, 1]."""
    values = [0.0, 1.0]
    for i in range(7):                                   # exponent 10^(i - 6)
        fractions = 2 ** i if signed else 2 ** (i + 1)   # the unsigned map's extra bit goes to the fraction
        edges = np.linspace(0.1, 1.0, fractions + 1)
        means = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (i - 6)
        values += list(means) + (list(-means) if signed else [])
    table = np.sort(np.asarray(values, np.float64))
    assert table.size == 256 and np.unique(table).size == 256
    return table


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """Blocks of `run` consecutive entries of axis `axis` times all axes after it."""

    shape: tuple[int, ...]
    axis: int
    run: int

    @property
    def blocks(self) -> int:
        return -(-self.shape[self.axis] // self.run)

    @property
    def absmax_shape(self) -> tuple[int, ...]:
        return self.shape[:self.axis] + (self.blocks,)

    @property
    def block_elements(self) -> int:
        return self.run * math.prod(self.shape[self.axis + 1:])

    def blocked(self, x):
        """x -> [*shape[:axis], blocks, run, *shape[axis+1:]], the last block padded with zeros."""
        pad = self.blocks * self.run - self.shape[self.axis]
        if pad:
            x = jnp.pad(x, [(0, 0)] * self.axis + [(0, pad)] + [(0, 0)] * (len(self.shape) - self.axis - 1))
        return x.reshape(self.shape[:self.axis] + (self.blocks, self.run) + self.shape[self.axis + 1:])

    def unblocked(self, x):
        x = x.reshape(self.shape[:self.axis] + (self.blocks * self.run,) + self.shape[self.axis + 1:])
        return x[(slice(None),) * self.axis + (slice(0, self.shape[self.axis]),)]

    def block_axes(self) -> tuple[int, ...]:
        """The axes of the blocked array that lie within one block."""
        return tuple(range(self.axis + 1, len(self.shape) + 1))


def block_layout(shape: tuple[int, ...], block_size: int) -> BlockLayout:
    """The layout of `shape` in blocks of (at most) `block_size` elements, cut on the outermost axis
    whose trailing product reaches block_size; a tensor smaller than a block is one block."""
    trailing = 1
    for axis in reversed(range(len(shape))):
        if trailing * shape[axis] >= block_size:
            return BlockLayout(tuple(shape), axis, max(1, block_size // trailing))
        trailing *= shape[axis]
    return BlockLayout(tuple(shape), 0, shape[0])


def nearest_code(x, midpoints):
    """Index of the map value nearest to x (ties to the lower), by binary search over the 255
    midpoints between neighbouring map values: eight gathers from a 255-entry table per element."""
    index = jnp.zeros(x.shape, jnp.int32)
    for step in (128, 64, 32, 16, 8, 4, 2, 1):
        candidate = index + step
        index = jnp.where(midpoints[candidate - 1] < x, candidate, index)
    return index.astype(jnp.uint8)


class Quantizer:
    """One map (signed or unsigned) in float32, quantizing and dequantizing tensors by layout."""

    def __init__(self, signed: bool):
        table = dynamic_map(signed)
        self.signed = signed
        self.table = table.astype(np.float32)
        self.midpoints = ((table[1:] + table[:-1]) / 2).astype(np.float32)

    def quantize(self, x, layout: BlockLayout):
        """x (float, layout.shape) -> (uint8 codes of x's shape, float32 absmax of layout.absmax_shape)."""
        blocks = layout.blocked(x.astype(jnp.float32))
        axes = layout.block_axes()
        absmax = jnp.max(jnp.abs(blocks), axis=axes)
        scale = jnp.where(absmax > 0, absmax, 1.0)
        normalized = blocks / jnp.expand_dims(scale, axes)
        codes = nearest_code(normalized, jnp.asarray(self.midpoints))
        return layout.unblocked(codes), absmax

    def dequantize(self, codes, absmax, layout: BlockLayout):
        values = jnp.asarray(self.table)[layout.blocked(codes).astype(jnp.int32)]
        return layout.unblocked(values * jnp.expand_dims(absmax, layout.block_axes()))


def quantize_reference(x: np.ndarray, layout: BlockLayout, signed: bool):
    """The same quantization in float64 numpy: each normalized value goes to the map value at the
    least distance (argmin over all 256; ties to the lower). Returns (codes, absmax)."""
    table = dynamic_map(signed)
    x = np.asarray(x, np.float64)
    pad = layout.blocks * layout.run - layout.shape[layout.axis]
    widths = [(0, 0)] * layout.axis + [(0, pad)] + [(0, 0)] * (x.ndim - layout.axis - 1)
    blocks = np.pad(x, widths).reshape(layout.shape[:layout.axis] + (layout.blocks, layout.run)
                                       + layout.shape[layout.axis + 1:])
    axes = layout.block_axes()
    absmax = np.max(np.abs(blocks), axis=axes)
    normalized = blocks / np.expand_dims(np.where(absmax > 0, absmax, 1.0), axes)
    codes = np.argmin(np.abs(normalized[..., None] - table), axis=-1).astype(np.uint8)
    codes = codes.reshape(layout.shape[:layout.axis] + (layout.blocks * layout.run,) + layout.shape[layout.axis + 1:])
    return codes[(slice(None),) * layout.axis + (slice(0, layout.shape[layout.axis]),)], absmax


def dequantize_reference(codes: np.ndarray, absmax: np.ndarray, layout: BlockLayout, signed: bool) -> np.ndarray:
    table = dynamic_map(signed)
    pad = layout.blocks * layout.run - layout.shape[layout.axis]
    widths = [(0, 0)] * layout.axis + [(0, pad)] + [(0, 0)] * (codes.ndim - layout.axis - 1)
    blocks = table[np.pad(codes, widths).reshape(layout.shape[:layout.axis] + (layout.blocks, layout.run)
                                                 + layout.shape[layout.axis + 1:]).astype(np.int64)]
    values = blocks * np.expand_dims(absmax.astype(np.float64), layout.block_axes())
    values = values.reshape(layout.shape[:layout.axis] + (layout.blocks * layout.run,) + layout.shape[layout.axis + 1:])
    return values[(slice(None),) * layout.axis + (slice(0, layout.shape[layout.axis]),)]
