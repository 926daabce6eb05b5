"""The Pallas sLSTM kernels (tpu.py, gpu.py): what the shared suite does not cover.

test_slstm.py runs `pallas_tpu` and `pallas_gpu` (interpret mode on a CPU) over the whole matrix
against the float64 reference (h, final state, every gradient; T in {1, 63, 64, 65, 257}, packed
segments, initial state, input gates at +-30, forget gates down to -20, bfloat16) and through the
laws. This file adds:

- the TPU-semantics interpreter (`pltpu.InterpretParams`: DMAs, semaphores, races);
- shapes that exercise the kernels' own paths: D not a multiple of anything (TPU full-dim
  blocks; GPU zero padding to 16), several batch blocks, several TPU time blocks with padding;
- segments starting on a TPU time-block boundary, at t = 1 and at the last step, with input gates
  of +-30 and forget gates of +-20 mixed in every step; the underflow guard (input gate -100 from
  a zero state);
- compilation the interpreter cannot check: Mosaic for a TPU v5e topology through libtpu
  (`tpu_compile`; D = 128 and 64, float32 and bfloat16, forward and backward) and the Pallas ->
  Triton lowering for CUDA.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from hybrax.pallas_kernels.slstm import api, gpu, tpu
from refusals import expect_refusal_or_run
from slstm_cases import REFUSED, Case, assert_matches_reference
from tpu_topology import v5e_device

KERNELS = {"pallas_tpu": tpu, "pallas_gpu": gpu}


# On a TPU the kernel runs compiled: the interpreter's CPU check has nothing to add there.
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the TPU-semantics interpreter is a CPU check")
@pytest.mark.parametrize("case", [Case(70, input_gate="uniform30", forget_min=-20.0),
                                  Case(33, dtype="bfloat16", B=3, D=12)], ids=lambda case: case.id)
@pytest.mark.slow
def test_tpu_semantics_interpreter_matches_reference(monkeypatch, case):
    kernel = functools.partial(tpu.slstm_kernel, interpret=pltpu.InterpretParams())
    monkeypatch.setitem(api.IMPLEMENTATIONS, "pallas_tpu", kernel)
    monkeypatch.setattr(tpu, "MAX_TIME_BLOCK", 16)  # several time blocks, the last one padded
    assert_matches_reference("pallas_tpu", case)


# D = 12 (TPU: blocks span the full unaligned D; GPU: padded to 16), B = 40 in small batch blocks
# (TPU 8 rows: five blocks; GPU 16 rows: three, the last one padded), TPU time blocks of 16.
@pytest.mark.parametrize("impl", list(KERNELS))
def test_unaligned_dim_and_batch_blocks_match_reference(monkeypatch, impl):
    monkeypatch.setattr(tpu, "MAX_BATCH_BLOCK", 8)
    monkeypatch.setattr(tpu, "MAX_TIME_BLOCK", 16)
    monkeypatch.setattr(gpu, "MAX_BATCH_BLOCK", 16)
    case = Case(37, B=40, H=1, D=12, input_gate="uniform30")
    expect_refusal_or_run(REFUSED, impl, case, lambda: assert_matches_reference(impl, case))


def _loss(fn, seg):
    def loss(x, R, state):
        h, final = fn(x, R, initial_state=state, segment_ids=seg, return_final_state=True)
        return jnp.sum(h * jnp.cos(h)) + sum(jnp.sum(s * w) for s, w in zip(final, (1.0, -0.5, 0.3, 2.0))), (h, final)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))


def _extreme_inputs(B=2, T=41, H=2, D=8, seed=3):
    keys = jax.random.split(jax.random.PRNGKey(seed), 6)
    x = jax.random.normal(keys[0], (B, T, H, 4, D))
    x = x.at[..., 0, :].set(jnp.where(jax.random.bernoulli(keys[1], 0.5, (B, T, H, D)), 30.0, -30.0))
    x = x.at[..., 1, :].set(jnp.where(jax.random.bernoulli(keys[2], 0.5, (B, T, H, D)), 20.0, -20.0))
    R = jax.random.normal(keys[3], (H, D, 4, D)) / np.sqrt(D)
    n0 = jax.random.uniform(keys[4], (B, H, D), minval=0.5, maxval=2.0)
    state = (n0 * 0.5, n0, 2.0 * jax.random.normal(keys[5], (B, H, D)), jnp.full((B, H, D), 0.3))
    return x, R, state


def _relative_errors(impl, x, R, state, seg):
    """Relative Frobenius errors of h, final state and all gradients against the float64 reference."""
    grads, (h, final) = _loss(api.IMPLEMENTATIONS[impl], seg)(x, R, state)
    with jax.enable_x64(True):
        f64 = lambda tree: jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), tree)
        want_grads, (want_h, want_final) = _loss(api.IMPLEMENTATIONS["reference"], seg)(f64(x), f64(R), f64(state))
        want = [np.asarray(v) for v in jax.tree.leaves((want_h, want_final, want_grads))]
    got = [np.asarray(v, np.float64) for v in jax.tree.leaves((h, final, grads))]
    assert all(np.all(np.isfinite(g)) for g in got), f"{impl}: inf/NaN"
    return np.array([np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-30) for g, w in zip(got, want)])


@pytest.mark.slow  # interpret mode: seconds per kernel; the fast suite keeps the unaligned-shape case
@pytest.mark.parametrize("impl", list(KERNELS))
def test_segment_on_time_block_boundary_and_extreme_gates(monkeypatch, impl):
    """TPU time blocks of 14 (T = 41: three blocks, one padded step): segments start at t = 1, on the
    block boundaries 14 and 28, and at the last step 40; input gates +-30 and forget gates +-20 in
    every step. h, final state and all gradients within 1e-4 of the float64 reference, or within
    twice xla's error where xla's own is larger: the gradient of the initial m is a sum of
    cancelling terms (xla.py: dm_0 = c_0 dc_0 + n_0 dn_0 + max path), 4e-4 in xla here too."""
    monkeypatch.setattr(tpu, "MAX_TIME_BLOCK", 14)
    x, R, state = _extreme_inputs()
    seg = jnp.asarray([[0] + [1] * 13 + [2] * 14 + [0] * 12 + [1],
                       [4] * 14 + [5] * 20 + [6] * 7], jnp.int32)

    def check():
        got = _relative_errors(impl, x, R, state, seg)
        floor = np.maximum(1e-4, 2 * _relative_errors("xla", x, R, state, seg))
        assert np.all(got <= floor), f"{impl}: relative errors {got} over {floor}"

    expect_refusal_or_run(REFUSED, impl, "segment_on_time_block_boundary", check)


@pytest.mark.slow
@pytest.mark.parametrize("impl", list(KERNELS))
def test_underflow_guard(impl):
    """From a zero state an input gate of -100 makes exp(i~ - m) underflow: n = c = 0, and h = 0
    with a finite, zero gradient through the division (reference.safe_ratio); the kernels' values
    and gradients match the float32 reference's."""
    x, R, _ = _extreme_inputs(T=5, seed=4)
    x = x.at[:, 0, :, 0].set(-100.0).at[..., 1, :].set(0.5)

    def loss(x, R, fn):
        h, final = fn(x, R, initial_state=None, segment_ids=None, return_final_state=True)
        return jnp.sum(h) + sum(jnp.sum(s) for s in final), h

    def check():
        grad = lambda fn: jax.jit(jax.grad(functools.partial(loss, fn=fn), argnums=(0, 1), has_aux=True))(x, R)
        got, want = grad(api.IMPLEMENTATIONS[impl]), grad(api.IMPLEMENTATIONS["reference"])
        assert np.all(np.asarray(got[1][:, 0]) == 0)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert np.all(np.isfinite(a))
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)

    expect_refusal_or_run(REFUSED, impl, "underflow_guard", check)


@pytest.mark.parametrize("impl", list(KERNELS))
def test_float64_is_refused_and_the_next_implementation_runs(impl):
    """The kernels compute in float32: float64 inputs (x64) raise NotImplementedError, so a list
    of implementations falls through to xla, and kernel_policy records why."""
    from hybrax.pallas_kernels.implementation import kernel_policy
    from hybrax.pallas_kernels.slstm import slstm
    with jax.enable_x64(True):
        x, R = jnp.zeros((1, 3, 1, 4, 2), jnp.float64), jnp.zeros((1, 2, 4, 2), jnp.float64)
        with pytest.raises(NotImplementedError, match="computes in float32"):
            KERNELS[impl].slstm_kernel(x, R, initial_state=None, segment_ids=None, return_final_state=False)
        with kernel_policy() as choices:
            h, _ = slstm(x, R, implementation=[impl, "xla"])
        assert h.dtype == jnp.float64 and choices.ran("slstm") == {"xla"}


def _kernel_loss(module):
    def loss(x, R, state, seg):
        h, final = module.slstm_kernel(x, R, initial_state=state, segment_ids=seg, return_final_state=True,
                                       interpret=False)
        return jnp.sum(h.astype(jnp.float32)) + sum(jnp.sum(s) for s in final)
    return loss


def _abstract_inputs(D, dtype, segments, sharding=None, B=8, T=250, H=2):
    spec = lambda shape, dt=dtype: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
    return (spec((B, T, H, 4, D)), spec((H, D, 4, D)), tuple(spec((B, H, D), jnp.float32) for _ in range(4)),
            spec((B, T), jnp.int32) if segments else None)


@pytest.mark.tpu_compile
@pytest.mark.parametrize("D,dtype,segments", [  # about 8 s each (the time loop is compiled): two of them slow
    (128, jnp.float32, True), pytest.param(128, jnp.bfloat16, True, marks=pytest.mark.slow),
    pytest.param(64, jnp.float32, False, marks=pytest.mark.slow), (64, jnp.bfloat16, True)])
def test_tpu_aot_compile_forward_and_backward(D, dtype, segments):
    """Mosaic compiles forward + backward on a v5e topology (no TPU needed); T = 250 is four time
    blocks of 63 (two padded steps) for D = 128, two of 125 for D = 64."""
    sharding = jax.sharding.SingleDeviceSharding(v5e_device())
    compiled = jax.jit(jax.value_and_grad(_kernel_loss(tpu), argnums=(0, 1, 2))).lower(
        *_abstract_inputs(D, dtype, segments, sharding)).compile()
    text = compiled.as_text()
    assert "slstm_fwd" in text and "slstm_bwd" in text


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
@pytest.mark.parametrize("D,dtype,segments", [(128, jnp.float32, True), (128, jnp.bfloat16, True),
                                              (12, jnp.float32, False)])
def test_gpu_lowers_to_triton(D, dtype, segments):
    """Forward + backward lower through Pallas' Triton backend for an (abstract) H100, no GPU
    needed. This checks the Pallas -> Triton IR lowering (shapes, ops), not Triton's own
    compilation to PTX."""
    h100 = jax.sharding.AbstractDevice("NVIDIA H100", None, "gpu")
    triton = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)):
        exported = jax.export.export(jax.jit(jax.grad(_kernel_loss(gpu), argnums=(0, 1, 2))),
                                     platforms=["cuda"], disabled_checks=[triton])(
            *_abstract_inputs(D, dtype, segments, B=4, T=64))
    assert exported.mlir_module().count("xla.gpu.triton") >= 2  # forward and backward kernels
