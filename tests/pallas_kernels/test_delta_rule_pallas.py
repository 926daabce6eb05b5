"""The Pallas delta-rule kernels (tpu.py, gpu.py): what the shared suite does not cover.

test_delta_rule.py runs `pallas_tpu` and `pallas_gpu` (interpret mode on a CPU) over the matrix
against the float64 reference: outputs, final state and every gradient (one or two cases by
default, the rest slow). This file adds:

- the TPU-semantics interpreter (`pltpu.InterpretParams`: DMAs, semaphores, races; slow);
- shapes that exercise the kernels' own paths: K, V not multiples of anything (TPU full-dim
  blocks; GPU zero padding to powers of two and two value blocks whose dq / dk / dbeta / dlog_decay
  partials are summed); segments starting exactly on chunk boundaries, beta exactly 0 and 1 and
  gates of -20 and -1e-6 mixed in every chunk;
- compilation the interpreter cannot check: Mosaic for a TPU v5e topology through libtpu
  (`tpu_compile`; K = V = 128, float32 and bfloat16) and the Pallas -> Triton lowering for CUDA.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from delta_rule_cases import REFUSED, Case, assert_matches_reference
from hybrax.pallas_kernels.delta_rule import api, gpu, reference, tpu
from refusals import expect_refusal_or_run
from tpu_topology import v5e_device

KERNELS = {"pallas_tpu": tpu.delta_rule_kernel, "pallas_gpu": gpu.delta_rule_kernel}


# On a TPU or GPU the kernels run compiled: the interpreter's CPU check has nothing to add there.
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the TPU-semantics interpreter is a CPU check")
@pytest.mark.parametrize("case", [Case(70, segments=True, chunk_size=32, B=1),
                                  Case(65, segments=True, beta="mixed", dtype="bfloat16", B=1)],
                         ids=lambda case: case.id)
@pytest.mark.slow
def test_tpu_semantics_interpreter_matches_reference(monkeypatch, case):
    kernel = functools.partial(tpu.delta_rule_kernel, interpret=pltpu.InterpretParams())
    monkeypatch.setitem(api.IMPLEMENTATIONS, "pallas_tpu", kernel)
    assert_matches_reference("pallas_tpu", case)


# K = 12, V = 80: TPU blocks span the full (unaligned) dims; GPU pads to K = 16, V = 128 and runs
# two value blocks of 64 whose partial gradients are summed.
@pytest.mark.parametrize("impl", list(KERNELS))
def test_unaligned_head_dims_match_reference(impl):
    case = Case(33, segments=True, chunk_size=16, K=12, V=80, B=1)
    expect_refusal_or_run(REFUSED, impl, case, lambda: assert_matches_reference(impl, case))


def _grads(fn, q, k, v, beta, g, s0, seg, chunk_size):
    def loss(q, k, v, beta, g, s0):
        o, state = fn(q, k, v, beta, g, scale=0.5, initial_state=s0, segment_ids=seg,
                      return_final_state=True, chunk_size=chunk_size)
        return jnp.sum(o * jnp.cos(o)) + jnp.sum(state ** 2), (o, state)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5), has_aux=True))(q, k, v, beta, g, s0)


@pytest.mark.slow  # interpret mode: seconds per kernel; the fast suite keeps the unaligned-shape case
@pytest.mark.parametrize("impl", list(KERNELS))
def test_segments_on_chunk_boundaries_beta_extremes_strong_decay(impl):
    """Segments [0]*16 [1]*16 [2]*9 with chunks of 16: segments 1 and 2 start exactly on chunk
    boundaries; beta is exactly 0 or 1 and gates mix -20 and -1e-6 in every chunk. Finite, and equal
    to the float32 reference (outputs, final state, all six gradients)."""
    B, T, H, K, V = 1, 41, 2, 8, 8
    keys = jax.random.split(jax.random.PRNGKey(3), 6)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    q, k = (unit(jax.random.normal(key, (B, T, H, K))) for key in keys[:2])
    v = jax.random.normal(keys[2], (B, T, H, V))
    beta = jax.random.bernoulli(keys[3], 0.5, (B, T, H)).astype(jnp.float32)
    g = jnp.where(jax.random.bernoulli(keys[4], 0.5, (B, T, H)), -20.0, -1e-6)
    s0 = jax.random.normal(keys[5], (B, H, K, V))
    seg = jnp.asarray([[0] * 16 + [1] * 16 + [2] * 9], jnp.int32)

    def check():
        got_grads, (got_o, got_state) = _grads(KERNELS[impl], q, k, v, beta, g, s0, seg, 16)
        want_grads, (want_o, want_state) = _grads(reference.delta_rule, q, k, v, beta, g, s0, seg, 16)
        for got, want in zip([got_o, got_state, *got_grads], [want_o, want_state, *want_grads]):
            assert np.all(np.isfinite(got))
            np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5 * float(jnp.max(jnp.abs(want))))

    expect_refusal_or_run(REFUSED, impl, "segments_on_chunk_boundaries", check)


def _loss(kernel_module, K):
    def loss(q, k, v, beta, g, s0, seg):
        o, state = kernel_module.delta_rule_kernel(q, k, v, beta, g, scale=K ** -0.5, initial_state=s0,
                                                   segment_ids=seg, return_final_state=True, chunk_size=64,
                                                   interpret=False)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(state)
    return loss


def _abstract_inputs(decay, dtype, segments, sharding=None, B=1, T=256, H=2, K=128):
    spec = lambda shape, dt=dtype: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
    return (spec((B, T, H, K)), spec((B, T, H, K)), spec((B, T, H, K)), spec((B, T, H)),
            spec((B, T, H), jnp.float32) if decay else None, spec((B, H, K, K), jnp.float32),
            spec((B, T), jnp.int32) if segments else None)


COMPILE_CASES = [(True, jnp.float32, True), (False, jnp.bfloat16, False), (True, jnp.bfloat16, True),
                 (False, jnp.float32, False)]


@pytest.mark.tpu_compile
@pytest.mark.parametrize("decay,dtype,segments", COMPILE_CASES)
def test_tpu_aot_compile_forward_and_backward(decay, dtype, segments):
    """Mosaic compiles forward + backward for K = V = 128 on a v5e topology (no TPU needed)."""
    sharding = jax.sharding.SingleDeviceSharding(v5e_device())
    args = _abstract_inputs(decay, dtype, segments, sharding)
    argnums = (0, 1, 2, 3, 4, 5) if decay else (0, 1, 2, 3, 5)
    compiled = jax.jit(jax.value_and_grad(_loss(tpu, 128), argnums=argnums)).lower(*args).compile()
    assert "delta_rule_bwd" in compiled.as_text()


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
@pytest.mark.parametrize("decay,dtype,segments", COMPILE_CASES[:3])
def test_gpu_lowers_to_triton(decay, dtype, segments):
    """Forward + backward lower through Pallas' Triton backend for an (abstract) H100, no GPU
    needed. This checks the Pallas -> Triton IR lowering (shapes, ops), not Triton's own
    compilation to PTX."""
    argnums = (0, 1, 2, 3, 4, 5) if decay else (0, 1, 2, 3, 5)
    h100 = jax.sharding.AbstractDevice("NVIDIA H100", None, "gpu")
    triton = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)):
        exported = jax.export.export(jax.jit(jax.grad(_loss(gpu, 128), argnums=argnums)),
                                     platforms=["cuda"], disabled_checks=[triton])(
            *_abstract_inputs(decay, dtype, segments))
    assert exported.mlir_module().count("xla.gpu.triton") >= 2  # forward and backward kernels
