"""Block-wise dynamic quantization (train/optimizers/block_quantization.py) against a float64
reference of the paper's quantization: the same map in float64 and a brute-force nearest value."""

import jax
import numpy as np
import pytest

from hybrax.train.optimizers.block_quantization import (Quantizer, block_layout, dequantize_reference, dynamic_map,
                                                        quantize_reference)


@pytest.mark.parametrize("signed", [True, False])
def test_the_dynamic_map_is_the_papers(signed):
    table = dynamic_map(signed)
    assert table.size == 256 and np.all(np.diff(table) > 0) and table[-1] == 1.0 and 0.0 in table
    positive = table[table > 0]
    # per exponent 10^e (e = -6 .. 0): 2^(e+6) fraction values per sign, twice that unsigned
    exponents = np.floor(np.log10(positive[positive < 1])).astype(int)
    counts = np.bincount(exponents + 7, minlength=7)   # 10^e * f with f in (0.1, 1): floor(log10) = e - 1
    assert list(counts) == [2 ** i * (1 if signed else 2) for i in range(7)]
    if signed:
        np.testing.assert_array_equal(table[table < 0], -positive[positive < 1][::-1])
    # the fraction values within one exponent are evenly spaced midpoints of linspace(0.1, 1)
    top = positive[(positive >= 0.1) & (positive < 1)]
    np.testing.assert_allclose(np.diff(top), 0.9 / top.size, rtol=1e-9)


@pytest.mark.parametrize("shape,block_size,axis,run", [((256, 704), 2048, 0, 2), ((704, 256), 2048, 0, 8),
                                                       ((256, 4, 64), 2048, 0, 8), ((4096,), 2048, 0, 2048),
                                                       ((3, 8192), 2048, 1, 2048), ((5, 7, 3), 16, 1, 5),
                                                       ((100,), 2048, 0, 100)])
def test_layouts(shape, block_size, axis, run):
    layout = block_layout(shape, block_size)
    assert (layout.axis, layout.run) == (axis, run)
    assert layout.block_elements <= block_size


def test_shaped_blocks_are_the_papers_runs_of_consecutive_elements():
    x = np.random.default_rng(0).standard_normal((64, 4, 64)).astype(np.float32)
    layout = block_layout(x.shape, 2048)
    _, absmax = Quantizer(signed=True).quantize(x, layout)
    np.testing.assert_array_equal(np.asarray(absmax), np.abs(x).reshape(-1, 2048).max(axis=1))


@pytest.mark.parametrize("signed,shape", [(True, (256, 704)), (False, (256, 704)), (True, (5, 7, 3)),
                                          (False, (33, 100))])
def test_jax_quantization_matches_the_float64_reference(signed, shape):
    """Codes equal the reference's except where a value sits within float32 rounding of the midpoint
    between two map values; dequantized values agree to float32 precision."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(np.float32)
    if not signed:
        x = x * x   # a second moment
    layout = block_layout(shape, 16 if len(shape) == 3 else 2048)
    quantizer = Quantizer(signed)
    codes, absmax = jax.jit(lambda v: quantizer.quantize(v, layout))(x)
    ref_codes, ref_absmax = quantize_reference(x, layout, signed)
    np.testing.assert_array_equal(np.asarray(absmax), ref_absmax.astype(np.float32))
    differ = np.asarray(codes) != ref_codes
    assert differ.mean() < 1e-4, differ.mean()
    ours = np.asarray(quantizer.dequantize(codes, absmax, layout))
    ref = dequantize_reference(ref_codes, ref_absmax, layout, signed)
    table = dynamic_map(signed)
    scale = np.broadcast_to(np.expand_dims(ref_absmax, layout.block_axes()), layout.blocked(x).shape)
    scale = np.asarray(layout.unblocked(scale))
    tie = np.abs(np.abs(x - ours) - np.abs(x - ref)) <= 1e-6 * scale   # equally near: a midpoint
    assert np.all(~differ | tie)
    np.testing.assert_allclose(ours[~differ], ref[~differ], rtol=1e-6, atol=1e-12)
    # the round trip errs by at most half the widest gap of the map (or -1's distance to the signed
    # map's most negative value, the same 0.00703), times the block's absmax, up to float32 rounding
    assert np.all(np.abs(x - ours) <= (np.max(np.diff(table)) / 2 + 1e-6) * scale)


def test_zero_blocks_round_trip_to_zero():
    layout = block_layout((4, 2048), 2048)
    x = np.zeros((4, 2048), np.float32)
    x[1] = np.linspace(-1, 1, 2048)
    for signed in (True, False):
        q = Quantizer(signed)
        codes, absmax = q.quantize(x if signed else np.abs(x), layout)
        out = np.asarray(q.dequantize(codes, absmax, layout))
        assert np.all(out[[0, 2, 3]] == 0) and np.asarray(absmax)[1] == 1.0
