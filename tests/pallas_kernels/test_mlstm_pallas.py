"""The Pallas mLSTM kernels (tpu.py, gpu.py): what the shared suite does not cover.

test_mlstm.py runs `pallas_tpu` and `pallas_gpu` (interpret mode on a CPU) over the matrix against
the float64 reference: outputs, final state (C, n, m) and every gradient. This file adds:

- the TPU-semantics interpreter (`pltpu.InterpretParams`: DMAs, semaphores, races);
- shapes that exercise the kernels' own paths: K, V not multiples of anything (TPU full-dim blocks;
  GPU zero padding to powers of two, two value blocks whose dq / dk / gate partials are summed),
  segments starting exactly on a chunk boundary, gates at their extremes (li = +-30, lf = -20 and
  ~0 mixed in one chunk);
- compilation the interpreter cannot check: Mosaic for a TPU v5e topology through libtpu
  (`tpu_compile`; K = V = 128, float32 and bfloat16) and the Pallas -> Triton lowering for CUDA.
"""

import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from hybrax.pallas_kernels.mlstm import api, reference, tpu
from mlstm_cases import REFUSED, Case, assert_matches_reference
from refusals import expect_refusal_or_run
from tpu_topology import v5e_device

HAS_GPU_KERNEL = importlib.util.find_spec("hybrax.pallas_kernels.mlstm.gpu") is not None
KERNELS = ["pallas_tpu"] + ["pallas_gpu"] * HAS_GPU_KERNEL


def _kernel(impl):
    if impl == "pallas_tpu":
        return tpu.mlstm_kernel
    from hybrax.pallas_kernels.mlstm import gpu
    return gpu.mlstm_kernel


# On a TPU or GPU the kernels run compiled: the interpreter's CPU check has nothing to add there.
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the TPU-semantics interpreter is a CPU check")
@pytest.mark.parametrize("case", [Case(40, "extreme", segments=True, chunk_size=16, B=1),
                                  Case(40, "moderate", segments=True, dtype="bfloat16", chunk_size=16, B=1)],
                         ids=lambda case: case.id)
@pytest.mark.slow
def test_tpu_semantics_interpreter_matches_reference(monkeypatch, case):
    kernel = functools.partial(tpu.mlstm_kernel, interpret=pltpu.InterpretParams())
    monkeypatch.setitem(api.IMPLEMENTATIONS, "pallas_tpu", kernel)
    assert_matches_reference("pallas_tpu", case)


# K = 12, V = 80: TPU blocks span the full (unaligned) dims; GPU pads to K = 16, V = 128 and runs
# two value blocks of 64 whose dq / dk / gate partials are summed.
@pytest.mark.parametrize("impl", KERNELS)
def test_unaligned_head_dims_match_reference(impl):
    case = Case(33, "moderate", segments=True, chunk_size=16, K=12, V=80, B=1, H=1)
    expect_refusal_or_run(REFUSED, impl, case, lambda: assert_matches_reference(impl, case))


def _grads(fn, q, k, v, li, lf, state, seg, chunk_size):
    def loss(q, k, v, li, lf, state):
        h, final = fn(q, k, v, li, lf, scale=0.5, initial_state=state, segment_ids=seg,
                      return_final_state=True, chunk_size=chunk_size)
        return jnp.sum(h * jnp.cos(h)) + sum(jnp.sum(s * jnp.sin(s)) for s in final), (h, final)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5), has_aux=True))(q, k, v, li, lf, state)


@pytest.mark.slow  # interpret mode: seconds per kernel; the fast suite keeps the unaligned-shape case
@pytest.mark.parametrize("impl", KERNELS)
def test_segment_on_chunk_boundary_and_extreme_gates(impl):
    """Segments [0]*16 [1]*8 [2]*17 with chunks of 16: segment 1 starts on a chunk boundary, segment 2
    mid-chunk; li mixes +-30 and lf mixes -20 and -1e-6 in every chunk. Finite, and equal to the
    float32 reference. The absolute tolerance has a floor of 2e-5: dm_0 is a sum of O(1) terms that
    cancel (h is invariant to scaling C_0 and n_0 together), so its roundoff is absolute."""
    B, T, H, K, V = 1, 41, 2, 8, 8
    keys = jax.random.split(jax.random.PRNGKey(3), 8)
    q, k = (jax.random.normal(key, (B, T, H, K)) for key in keys[:2])
    v = jax.random.normal(keys[2], (B, T, H, V))
    li = jnp.where(jax.random.bernoulli(keys[3], 0.5, (B, T, H)), 30.0, -30.0)
    lf = jnp.where(jax.random.bernoulli(keys[4], 0.5, (B, T, H)), -20.0, -1e-6)
    state = (jax.random.normal(keys[5], (B, H, K, V)), jax.random.normal(keys[6], (B, H, K)),
             jax.random.uniform(keys[7], (B, H), minval=-3.0, maxval=3.0))
    seg = jnp.asarray([[0] * 16 + [1] * 8 + [2] * 17], jnp.int32)

    def check():
        got_grads, (got_h, got_state) = _grads(_kernel(impl), q, k, v, li, lf, state, seg, 16)
        want_grads, (want_h, want_state) = _grads(reference.mlstm, q, k, v, li, lf, state, seg, 16)
        for got, want in zip(jax.tree.leaves((got_h, got_state, got_grads)),
                             jax.tree.leaves((want_h, want_state, want_grads))):
            assert np.all(np.isfinite(got))
            np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5 * max(float(jnp.max(jnp.abs(want))), 1.0))

    expect_refusal_or_run(REFUSED, impl, "segment_on_chunk_boundary", check)


def _loss(kernel, K):
    def loss(q, k, v, li, lf, state, seg):
        h, final = kernel(q, k, v, li, lf, scale=K ** -0.5, initial_state=state, segment_ids=seg,
                          return_final_state=True, chunk_size=64, interpret=False)
        return jnp.sum(h.astype(jnp.float32)) + sum(jnp.sum(s) for s in final)
    return loss


def _abstract_inputs(dtype, segments, sharding=None, B=1, T=256, H=2, K=128):
    spec = lambda shape, dt=dtype: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
    state = (spec((B, H, K, K), jnp.float32), spec((B, H, K), jnp.float32), spec((B, H), jnp.float32))
    return (spec((B, T, H, K)), spec((B, T, H, K)), spec((B, T, H, K)), spec((B, T, H), jnp.float32),
            spec((B, T, H), jnp.float32), state, spec((B, T), jnp.int32) if segments else None)


COMPILE_CASES = [(jnp.float32, True), (jnp.bfloat16, True), (jnp.float32, False)]


@pytest.mark.tpu_compile
@pytest.mark.parametrize("dtype,segments", COMPILE_CASES)
def test_tpu_aot_compile_forward_and_backward(dtype, segments):
    """Mosaic compiles forward + backward for K = V = 128 on a v5e topology (no TPU needed)."""
    sharding = jax.sharding.SingleDeviceSharding(v5e_device())
    args = _abstract_inputs(dtype, segments, sharding)
    compiled = jax.jit(jax.value_and_grad(_loss(tpu.mlstm_kernel, 128), argnums=(0, 1, 2, 3, 4, 5))
                       ).lower(*args).compile()
    assert "mlstm_bwd" in compiled.as_text()


@pytest.mark.skipif(not HAS_GPU_KERNEL, reason="pallas_kernels/mlstm/gpu.py not written yet")
@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
@pytest.mark.parametrize("dtype,segments", COMPILE_CASES[:2])
def test_gpu_lowers_to_triton(dtype, segments):
    """Forward + backward lower through Pallas' Triton backend for an (abstract) H100, no GPU
    needed. This checks the Pallas -> Triton IR lowering (shapes, ops), not Triton's own
    compilation to PTX."""
    from hybrax.pallas_kernels.mlstm import gpu
    h100 = jax.sharding.AbstractDevice("NVIDIA H100", None, "gpu")
    triton = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)):
        exported = jax.export.export(jax.jit(jax.grad(_loss(gpu.mlstm_kernel, 128), argnums=(0, 1, 2, 3, 4, 5))),
                                     platforms=["cuda"], disabled_checks=[triton])(
            *_abstract_inputs(dtype, segments))
    assert exported.mlir_module().count("xla.gpu.triton") >= 2  # forward and backward kernels
