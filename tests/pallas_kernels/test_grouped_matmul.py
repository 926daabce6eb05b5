"""grouped_matmul: every implementation against the reference (output, dlhs and drhs under a
random cotangent) in float32 and bfloat16 over group layouts with empty groups, one group holding
every row, uneven sizes, rows after the last group, M = 1 and odd M, G = 1; both paths of the xla
implementation (padded capacity, tile loop); jit == eager; float32 accumulation; the one-line
input errors and the implementation switch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrax.pallas_kernels.grouped_matmul import grouped_matmul
from hybrax.pallas_kernels.grouped_matmul import xla
from refusals import ON_THE_OTHER_ACCELERATOR, expect_refusal_or_run

# (name, M, K, N, group_sizes); the xla path each takes is checked in test_cases_cover_both_xla_paths
CASES = [
    ("uneven", 65, 32, 16, (20, 0, 30, 15)),
    ("balanced", 64, 16, 24, (16, 16, 16, 16)),
    ("empty_groups", 63, 16, 8, (0, 40, 0, 23, 0)),
    ("one_group_holds_all", 64, 16, 8, (0, 64, 0)),
    ("rows_after_last_group", 65, 16, 8, (10, 25, 5)),
    ("rows_after_last_group_tile_path", 65, 16, 8, (60, 0, 0)),
    ("all_groups_empty", 7, 8, 8, (0, 0)),
    ("M_is_1", 1, 8, 16, (0, 1)),
    ("M_is_257", 257, 24, 16, (100, 57, 100)),
    ("G_is_1", 63, 16, 8, (63,)),
]
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
# pallas_tpu runs megablox in TPU interpret mode (slow on CPU): a few cases
PALLAS_CASES = {jnp.float32: ["uneven", "one_group_holds_all", "rows_after_last_group", "M_is_1"],
                jnp.bfloat16: ["uneven", "rows_after_last_group"]}
# Refusals on purpose (refusals.py): any other NotImplementedError on these cases is a failure.
# Only megablox on a GPU: every case's K and N are whole tiles (<= 2048) in float32 / bfloat16.
REFUSED = [*ON_THE_OTHER_ACCELERATOR]


def make_inputs(M, K, N, sizes, dtype, seed=0):
    kx, kw, kc = jax.random.split(jax.random.key(seed), 3)
    lhs = jax.random.normal(kx, (M, K), jnp.float32).astype(dtype)
    rhs = (jax.random.normal(kw, (len(sizes), K, N), jnp.float32) / np.sqrt(K)).astype(dtype)
    cotangent = jax.random.normal(kc, (M, N), jnp.float32)
    return lhs, rhs, jnp.asarray(sizes, jnp.int32), cotangent


def output_and_grads(impl, lhs, rhs, group_sizes, cotangent, **kw):
    """(out, dlhs, drhs) of sum(out * cotangent), jitted."""
    def run(lhs, rhs, group_sizes, cotangent):
        f = lambda lhs, rhs: grouped_matmul(lhs, rhs, group_sizes, implementation=impl, **kw)
        out, vjp = jax.vjp(f, lhs, rhs)
        return (out, *vjp(cotangent.astype(out.dtype)))
    return jax.jit(run)(lhs, rhs, group_sizes, cotangent)


def relative_error(got, want):
    want = np.asarray(want, np.float32)
    return float(np.max(np.abs(np.asarray(got, np.float32) - want), initial=0)) / (float(np.max(np.abs(want), initial=0)) + 1e-30)


@functools.cache
def reference_output_and_grads(case, dtype):
    _, M, K, N, sizes = case
    return output_and_grads("reference", *make_inputs(M, K, N, sizes, dtype))


def assert_matches_reference(impl, case, dtype):
    _, M, K, N, sizes = case
    lhs, rhs, group_sizes, cotangent = make_inputs(M, K, N, sizes, dtype)
    got = output_and_grads(impl, lhs, rhs, group_sizes, cotangent)
    want = reference_output_and_grads(case, dtype)
    for name, g, w, like in zip(("out", "dlhs", "drhs"), got, want, (want[0], lhs, rhs)):
        assert g.shape == w.shape and g.dtype == like.dtype, f"{name}: {g.shape} {g.dtype}, want {w.shape} {like.dtype}"
        err = relative_error(g, w)
        assert err <= TOLERANCE[dtype], f"{name}: relative error {err:.2e} > {TOLERANCE[dtype]}"
    total = sum(sizes)   # rows after the last group: exactly 0, and no gradient
    assert np.all(np.asarray(got[0][total:], np.float32) == 0)
    assert np.all(np.asarray(got[1][total:], np.float32) == 0)


@pytest.mark.parametrize("impl,case,dtype", [
    pytest.param(impl, case, dtype, id=f"{impl}-{case[0]}-{name}")
    for dtype, name in ((jnp.float32, "fp32"), (jnp.bfloat16, "bf16"))
    for impl in ("xla", "ragged_dot", "pallas_tpu") for case in CASES
    if impl != "pallas_tpu" or case[0] in PALLAS_CASES[dtype]])
def test_matches_reference(impl, case, dtype):
    expect_refusal_or_run(REFUSED, impl, case[0], lambda: assert_matches_reference(impl, case, dtype))


def test_cases_cover_both_xla_paths():
    """The cases run the capacity path (largest group fits the largest capacity) and the tile loop."""
    paths = set()
    for _, M, _, _, sizes in CASES:
        capacities = xla.plan(M, len(sizes)).capacities
        paths.add("capacity" if capacities and max(sizes) <= max(capacities) else "tiles")
    assert paths == {"capacity", "tiles"}


@pytest.mark.parametrize("impl", ["xla", "ragged_dot"])
def test_bf16_inputs_accumulate_in_float32(impl):
    """bf16 inputs with preferred_element_type=float32: the output is float32 and matches the
    float32 product of the same (bf16-valued) inputs to float32 accuracy."""
    case = next(c for c in CASES if c[0] == "uneven")
    _, M, K, N, sizes = case
    lhs, rhs, group_sizes, _ = make_inputs(M, K, N, sizes, jnp.bfloat16)
    out = grouped_matmul(lhs, rhs, group_sizes, preferred_element_type=jnp.float32, implementation=impl)
    want = grouped_matmul(lhs.astype(jnp.float32), rhs.astype(jnp.float32), group_sizes, implementation="reference")
    assert out.dtype == jnp.float32
    assert relative_error(out, want) <= 1e-5


def test_jit_equals_eager():
    for _, M, K, N, sizes in (c for c in CASES if c[0] in ("uneven", "one_group_holds_all")):   # both xla paths
        lhs, rhs, group_sizes, _ = make_inputs(M, K, N, sizes, jnp.float32)
        eager = grouped_matmul(lhs, rhs, group_sizes, implementation="xla")
        jitted = jax.jit(lambda a, b, g: grouped_matmul(a, b, g, implementation="xla"))(lhs, rhs, group_sizes)
        np.testing.assert_allclose(eager, jitted, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU default; elsewhere auto may pick ragged_dot")
def test_default_on_cpu_is_xla():
    lhs, rhs, group_sizes, _ = make_inputs(65, 32, 16, (20, 0, 30, 15), jnp.float32)
    np.testing.assert_array_equal(grouped_matmul(lhs, rhs, group_sizes),
                                  grouped_matmul(lhs, rhs, group_sizes, implementation="xla"))


def test_pallas_tpu_refuses_float16_and_falls_through():
    lhs, rhs, group_sizes, _ = make_inputs(16, 8, 8, (8, 8), jnp.float16)
    with pytest.raises(NotImplementedError, match="float16"):
        grouped_matmul(lhs, rhs, group_sizes, implementation="pallas_tpu")
    out = grouped_matmul(lhs, rhs, group_sizes, implementation=["pallas_tpu", "xla"])
    want = grouped_matmul(lhs, rhs, group_sizes, implementation="reference")
    assert out.dtype == jnp.float16 and relative_error(out, want) <= 2e-3


def test_pallas_tpu_refuses_untileable_dims():
    lhs, rhs, group_sizes, _ = make_inputs(8, 2056, 8, (8,), jnp.float32)
    with pytest.raises(NotImplementedError, match="K=2056"):
        grouped_matmul(lhs, rhs, group_sizes, implementation="pallas_tpu")


_x, _w, _g = jnp.zeros((8, 4)), jnp.zeros((2, 4, 3)), jnp.array([4, 4], jnp.int32)


@pytest.mark.parametrize("lhs,rhs,group_sizes,kw,message", [
    (jnp.zeros((2, 8, 4)), _w, _g, {}, r"lhs must be \[M, K\]; got shape \(2, 8, 4\)"),
    (_x, jnp.zeros((4, 3)), _g, {}, r"rhs must be \[G, K, N\]; got shape \(4, 3\)"),
    (_x, jnp.zeros((2, 5, 3)), _g, {}, r"lhs K=4 must equal rhs K=5"),
    (_x, _w, jnp.array([4, 4, 0], jnp.int32), {}, r"group_sizes shape \(3,\) must be \[G\] = \(2,\)"),
    (_x, _w, jnp.array([[4, 4]], jnp.int32), {}, r"group_sizes shape \(1, 2\) must be \[G\]"),
    (_x, _w, jnp.array([4.0, 4.0]), {}, r"group_sizes dtype float32 must be an integer dtype"),
    (jnp.zeros((8, 4), jnp.int32), _w, _g, {}, r"lhs dtype int32 must be a float dtype"),
    (_x, jnp.zeros((2, 4, 3), jnp.int8), _g, {}, r"rhs dtype int8 must be a float dtype"),
    (_x, _w, _g, {"preferred_element_type": jnp.int32}, r"preferred_element_type=.* must be None or a float"),
    (_x, _w, jnp.array([9, -1], jnp.int32), {}, r"group_sizes \(min -1, sum 8\) must be >= 0"),
    (_x, _w, jnp.array([5, 4], jnp.int32), {}, r"group_sizes \(min 4, sum 9\) must be >= 0 with sum <= M=8"),
    (_x, _w, _g, {"implementation": "cuda"}, r"implementation='cuda' is unknown"),
])
def test_invalid_inputs_raise_one_line_errors(lhs, rhs, group_sizes, kw, message):
    with pytest.raises(ValueError, match=message) as info:
        grouped_matmul(lhs, rhs, group_sizes, **kw)
    assert "\n" not in str(info.value)
