"""The Pallas linear-attention kernels (tpu.py, gpu.py) against the float64 reference.

Every check compares outputs, the final state and every gradient (q, k, v, log_decay, initial
state) of a random linear functional of (o, final state) with `reference.py` run in float64.
On a CPU the kernels run in Pallas interpret mode; `InterpretParams` adds TPU semantics (DMAs,
semaphores, races). The `tpu_compile` tests compile forward + backward for a v5e topology
through libtpu, which checks the Mosaic lowering rules that interpret mode does not.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.linear_attention import gpu, linear_attention, reference, tpu

KERNELS = {
    "pallas_tpu": functools.partial(tpu.linear_attention_kernel, interpret=True),
    "pallas_tpu_semantics": functools.partial(tpu.linear_attention_kernel,
                                              interpret=pltpu.InterpretParams()),
    "pallas_gpu": functools.partial(gpu.linear_attention_kernel, interpret=True),
}


def make_inputs(seed, *, T, decay, B=2, H=2, K=8, V=16, segments=False, initial_state=True,
                decay_min=-1.0, dtype=jnp.float32):
    keys = jax.random.split(jax.random.PRNGKey(seed), 6)
    q = jax.random.normal(keys[0], (B, T, H, K)).astype(dtype)
    k = jax.random.normal(keys[1], (B, T, H, K)).astype(dtype)
    v = jax.random.normal(keys[2], (B, T, H, V)).astype(dtype)
    g = None
    if decay is not None:
        shape = (B, T, H) if decay == "scalar" else (B, T, H, K)
        g = jax.random.uniform(keys[3], shape, jnp.float32, decay_min, 0.0)
    s0 = jax.random.normal(keys[4], (B, H, K, V)) if initial_state else None
    seg = None
    if segments:  # ~5 segments per row, the first starting mid-sequence in row 0
        seg = jnp.cumsum(jax.random.bernoulli(keys[5], 5.0 / max(T, 1), (B, T)), axis=1).astype(jnp.int32)
    return q, k, v, g, s0, seg


def outputs_and_grads(fn, q, k, v, g, s0, seg, *, chunk_size):
    """(o, final state, grads of a fixed random functional w.r.t. every float input)."""
    B, T, H, K = q.shape
    w_o = jax.random.normal(jax.random.PRNGKey(7), (B, T, H, v.shape[-1]), jnp.float32)
    w_s = jax.random.normal(jax.random.PRNGKey(8), (B, H, K, v.shape[-1]), jnp.float32)
    argnums = tuple(i for i, x in enumerate((q, k, v, g, s0)) if x is not None)

    def run(q, k, v, g, s0):
        return fn(q, k, v, g, scale=K ** -0.5, initial_state=s0, segment_ids=seg,
                  return_final_state=True, chunk_size=chunk_size)

    def loss(*args):
        o, state = run(*args)
        return jnp.sum(o.astype(w_o.dtype) * w_o) + jnp.sum(state.astype(w_s.dtype) * w_s)

    @jax.jit
    def everything(q, k, v, g, s0):
        o, state = run(q, k, v, g, s0)
        return [o, state, *jax.grad(loss, argnums=argnums)(q, k, v, g, s0)]

    return everything(q, k, v, g, s0)


def reference_float64(q, k, v, g, s0, seg, *, chunk_size):
    f64 = lambda x: None if x is None else np.asarray(x, np.float64)
    with jax.enable_x64(True):
        got = outputs_and_grads(reference.linear_attention, f64(q), f64(k), f64(v), f64(g), f64(s0),
                                seg, chunk_size=chunk_size)
        return [np.asarray(x) for x in got]


def assert_close(got, want, tol):
    names = ["o", "final_state", "grads..."]
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        a = np.asarray(a, np.float64)
        assert np.all(np.isfinite(a)), f"{names[min(i, 2)]} #{i} has inf/NaN"
        err = np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)
        assert err <= tol, f"output #{i} ({names[min(i, 2)]}): relative error {err:.2e} > {tol:.0e}"


def check(kernel, *, chunk_size=64, tol=1e-4, **case):
    inputs = make_inputs(0, **case)
    got = outputs_and_grads(KERNELS[kernel], *inputs, chunk_size=chunk_size)
    if case.get("dtype", jnp.float32) != jnp.float32:
        for x, y in zip(got[:1] + got[2:], inputs[:3]):
            assert x.dtype == y.dtype
    assert_close(got, reference_float64(*inputs, chunk_size=chunk_size), tol)


KERNEL_NAMES = [name for name in KERNELS if name != "pallas_tpu_semantics"]


# T around the default chunk of 64, each with another decay form; initial state throughout.
@pytest.mark.parametrize("kernel", KERNEL_NAMES)
@pytest.mark.parametrize("T,decay", [(1, "channel"), (63, "scalar"), (64, None), (65, "channel"),
                                     (257, "scalar")])
def test_fp32_matches_reference(kernel, T, decay):
    check(kernel, T=T, decay=decay)


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
@pytest.mark.parametrize("decay", [None, "scalar", "channel"])
def test_packed_segments_match_reference(kernel, decay):
    check(kernel, T=50, decay=decay, segments=True, chunk_size=16)


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
@pytest.mark.parametrize("decay", ["scalar", "channel"])
def test_strong_decay_is_finite_and_matches(kernel, decay):
    # b_t reaches -20 * 64 within a chunk: any exp(-b) would overflow to inf.
    check(kernel, T=70, decay=decay, decay_min=-20.0, segments=True)


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
@pytest.mark.parametrize("decay", ["scalar", "channel"])
def test_bf16_matches_reference(kernel, decay):
    check(kernel, T=40, decay=decay, dtype=jnp.bfloat16, chunk_size=16, tol=2e-2, segments=True)


@pytest.mark.parametrize("decay", ["scalar", "channel"])
def test_tpu_semantics_interpreter(decay):
    """pltpu.InterpretParams: the TPU interpreter that models DMAs, semaphores and races."""
    check("pallas_tpu_semantics", T=40, decay=decay, segments=True, chunk_size=16)


def test_no_initial_state_and_public_api():
    """Dispatch through the public op, no initial state: same numbers as the xla-free reference."""
    q, k, v, g, _, seg = make_inputs(1, T=33, decay="scalar", segments=True)
    o, state = linear_attention(q, k, v, g, segment_ids=seg, return_final_state=True, chunk_size=16,
                                implementation="pallas_tpu")
    o_ref, state_ref = linear_attention(q, k, v, g, segment_ids=seg, return_final_state=True,
                                        implementation="reference")
    np.testing.assert_allclose(o, o_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(state, state_ref, rtol=1e-4, atol=1e-5)
    o_only, none = linear_attention(q, k, v, g, chunk_size=16, implementation="pallas_tpu")
    assert none is None and o_only.dtype == v.dtype


@pytest.mark.parametrize("implementation,chunk_size", [("pallas_tpu", 12), ("pallas_gpu", 24),
                                                        ("pallas_gpu", 8)])
def test_unsupported_chunk_size_is_refused(implementation, chunk_size):
    q, k, v, g, _, _ = make_inputs(0, T=8, decay=None, initial_state=False)
    with pytest.raises(NotImplementedError, match=f"chunk_size={chunk_size}"):
        linear_attention(q, k, v, chunk_size=chunk_size, implementation=implementation)


def _v5e_device():
    pytest.importorskip("libtpu", reason="libtpu not installed (pip install -e '.[test]')")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other jax processes may hold the lock
    from jax.experimental import topologies
    return topologies.get_topology_desc("v5e:2x2", "tpu").devices[0]


@pytest.mark.tpu_compile
@pytest.mark.parametrize("decay,dtype,segments", [(None, jnp.bfloat16, False),
                                                  ("scalar", jnp.float32, True),
                                                  ("channel", jnp.bfloat16, True),
                                                  ("channel", jnp.float32, False)])
def test_tpu_aot_compile_forward_and_backward(decay, dtype, segments):
    """Mosaic lowering of forward + backward for K = V = 128 on a v5e topology (no TPU needed)."""
    sharding = jax.sharding.SingleDeviceSharding(_v5e_device())
    B, T, H, K = 1, 256, 2, 128
    spec = lambda shape, dt=dtype: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
    g = None if decay is None else spec((B, T, H) if decay == "scalar" else (B, T, H, K), jnp.float32)
    seg = spec((B, T), jnp.int32) if segments else None

    def loss(q, k, v, g, s0, seg):
        o, state = tpu.linear_attention_kernel(q, k, v, g, scale=K ** -0.5, initial_state=s0,
                                               segment_ids=seg, return_final_state=True,
                                               chunk_size=64, interpret=False)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(state)

    argnums = (0, 1, 2, 4) if g is None else (0, 1, 2, 3, 4)
    compiled = jax.jit(jax.value_and_grad(loss, argnums=argnums)).lower(
        spec((B, T, H, K)), spec((B, T, H, K)), spec((B, T, H, K)), g, spec((B, H, K, K), jnp.float32),
        seg).compile()
    assert "linear_attention_bwd" in compiled.as_text()


@pytest.mark.parametrize("decay,dtype,segments", [(None, jnp.bfloat16, True), ("scalar", jnp.float32, False),
                                                  ("channel", jnp.bfloat16, True)])
def test_gpu_lowers_to_triton(decay, dtype, segments):
    """Forward + backward lower through Pallas' Triton backend for CUDA (no GPU needed).

    This checks the Pallas -> Triton IR lowering (shapes, ops), not Triton's own compilation.
    """
    B, T, H, K = 1, 256, 2, 128
    spec = jax.ShapeDtypeStruct
    g = None if decay is None else spec((B, T, H) if decay == "scalar" else (B, T, H, K), jnp.float32)
    seg = spec((B, T), jnp.int32) if segments else None

    def loss(q, k, v, g, s0, seg):
        o, state = gpu.linear_attention_kernel(q, k, v, g, scale=K ** -0.5, initial_state=s0,
                                               segment_ids=seg, return_final_state=True,
                                               chunk_size=64, interpret=False)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(state)

    argnums = (0, 1, 2, 4) if g is None else (0, 1, 2, 3, 4)
    triton = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    try:
        exported = jax.export.export(jax.jit(jax.grad(loss, argnums=argnums)), platforms=["cuda"],
                                     disabled_checks=[triton])(
            spec((B, T, H, K), dtype), spec((B, T, H, K), dtype), spec((B, T, H, K), dtype), g,
            spec((B, H, K, K), jnp.float32), seg)
    except ValueError as e:
        if "abstract GPU device" in str(e):
            pytest.skip(f"this jax ({jax.__version__}) needs a GPU to pick the Triton target")
        raise
    assert exported.mlir_module().count("xla.gpu.triton") >= 2  # forward and backward kernels
