"""The fused dot_product_attention implementations, `splash` (jax's splash attention, TPU
interpret mode on a CPU) and `pallas_gpu` (hybrax's block-sparse Pallas GPU kernel with every
causal block listed, Pallas interpret mode on a CPU), against the float32 `reference`: the output
and the gradients of q, k and v, with packed segment ids and GQA (H = 4, Hkv = 2 and 1), at odd
lengths (both pad T to their blocks, so every T runs), fp32 and bf16.

A kernel's NotImplementedError fails a test, except in `test_refusals_fall_through`, which lists
the inputs refused on purpose. `tpu_compile` tests AOT-compile splash through Mosaic for a v5e
topology; the `slow` one holds its memory plan at T = 32768 against the dense xla path.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from hybrax.pallas_kernels.dot_product_attention import api, block_sparse, dot_product_attention, splash
from hybrax.pallas_kernels.implementation import kernel_policy, target_backend
from tpu_topology import v5e_device

FUSED = ["splash", "pallas_gpu"]
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}
# Interpret-mode kernels are large CPU programs: most of a case's time is XLA compiling them.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@dataclasses.dataclass(frozen=True)
class Case:
    T: int
    kv_heads: int
    dtype: str = "float32"
    segments: bool = True
    causal: bool = True

    @property
    def id(self) -> str:
        return (f"T{self.T}-Hkv{self.kv_heads}-{self.dtype}" + ("" if self.segments else "-noseg")
                + ("" if self.causal else "-full"))


CASES = [Case(1, 2), Case(63, 1), Case(65, 2), Case(257, 1), Case(128, 2, segments=False),
         Case(65, 2, segments=False, causal=False), Case(65, 2, "bfloat16"), Case(257, 1, "bfloat16")]
SLOW_CASES = {"T257-Hkv1-float32", "T128-Hkv2-float32-noseg", "T257-Hkv1-bfloat16"}   # make test-slow


def packed_segments(B, T, seed=0):
    """Random document boundaries per row (about one every 20 tokens), ids counting from 1."""
    starts = np.random.default_rng(seed).random((B, T)) < 0.05
    starts[:, 0] = True
    return jnp.asarray(np.cumsum(starts, axis=1), jnp.int32)


def inputs(case: Case, B=2, H=4, D=64):
    kq, kk, kv = jax.random.split(jax.random.key(case.T), 3)
    q = jax.random.normal(kq, (B, case.T, H, D), case.dtype)
    k = jax.random.normal(kk, (B, case.T, case.kv_heads, D), case.dtype)
    v = jax.random.normal(kv, (B, case.T, case.kv_heads, D), case.dtype)
    return q, k, v, packed_segments(B, case.T) if case.segments else None


def output_and_grads(impl, q, k, v, **kw):
    """(o, dq, dk, dv) of a fixed random projection of o, in one jit."""
    weights = jnp.cos(jnp.arange(q.size, dtype=jnp.float32)).reshape(q.shape)

    def loss(q, k, v):
        o = dot_product_attention(q, k, v, implementation=impl, **kw)
        return jnp.sum(o.astype(jnp.float32) * weights), o

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    (_, o), grads = grad.lower(q, k, v).compile(FAST_COMPILE)(q, k, v)
    return (o, *grads)


def relative_errors(impl, q, k, v, **kw) -> dict[str, float]:
    """max |got - want| / max |want| for o, dq, dk, dv (absolute where want is all zeros)."""
    got = output_and_grads(impl, q, k, v, **kw)
    want = output_and_grads("reference", *(x.astype(jnp.float32) for x in (q, k, v)), **kw)
    errors = {}
    for name, g, w in zip(["o", "dq", "dk", "dv"], got, want):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert np.all(np.isfinite(g)), f"{name}: non-finite values"
        errors[name] = float(np.max(np.abs(g - w)) / (np.max(np.abs(w)) or 1.0))
    return errors


def assert_matches_reference(impl, case: Case):
    q, k, v, segment_ids = inputs(case)
    errors = relative_errors(impl, q, k, v, causal=case.causal, segment_ids=segment_ids)
    print(f"{impl} {case.id}: " + " ".join(f"{n} {e:.1e}" for n, e in errors.items()))
    bad = {n: e for n, e in errors.items() if e > TOLERANCE[case.dtype]}
    assert not bad, f"{impl} {case.id}: relative errors {bad} > {TOLERANCE[case.dtype]}"


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c.id in SLOW_CASES else c for c in CASES],
                         ids=lambda case: case.id)
@pytest.mark.parametrize("impl", FUSED)
def test_fused_matches_reference(impl, case):
    assert_matches_reference(impl, case)


@pytest.mark.slow
def test_splash_tpu_semantics_interpreter(monkeypatch):
    """pltpu.InterpretParams(): the TPU interpreter that also checks DMAs, semaphores and races."""
    def kernel(q, k, v, *, causal, scale, segment_ids, mask):
        return splash.splash_attention(q, k, v, causal=causal, scale=scale, segment_ids=segment_ids,
                                       interpret=pltpu.InterpretParams())
    monkeypatch.setitem(api.IMPLEMENTATIONS, "splash", kernel)
    assert_matches_reference("splash", Case(65, 2))


@pytest.mark.parametrize("impl", FUSED)
def test_refusals_fall_through(impl):
    """Refused on purpose: an explicit mask, causal Tq != Tk (the KV-cache case), and the other
    accelerator's backend. Each raises NotImplementedError, and [impl, "xla"] runs xla instead."""
    q, k, v, _ = inputs(Case(8, 2))
    mask = jnp.tril(jnp.ones((8, 8), bool))
    with pytest.raises(NotImplementedError, match="mask"):
        dot_product_attention(q, k, v, mask=mask, implementation=impl)
    with pytest.raises(NotImplementedError, match="Tq"):
        dot_product_attention(q[:, -3:], k, v, causal=True, implementation=impl)
    with target_backend("gpu" if impl == "splash" else "tpu"), pytest.raises(NotImplementedError, match="kernel"):
        dot_product_attention(q, k, v, implementation=impl)
    with kernel_policy() as choices:
        out = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, mask=mask, implementation=[impl, "xla"]))(q, k, v)
    assert choices.ran("dot_product_attention") == {"xla"}
    want = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, mask=mask, implementation="reference"))(q, k, v)
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)


def test_default_blocks_tile_any_length():
    assert [splash.block_size_for(t) for t in (1, 129, 512, 640, 32768)] == [128, 256, 512, 128, 512]
    assert [block_sparse.block_size_for(t) for t in (1, 20, 64, 1000)] == [16, 32, 64, 64]
    causal = block_sparse.all_blocks(1, 1, 130, 130, 64, causal=True)[0, 0]
    np.testing.assert_array_equal(causal, [[0, -1, -1], [0, 1, -1], [0, 1, 2]])


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
def test_pallas_gpu_lowers_to_triton_for_h100():
    """The GPU dispatch (cudnn refuses segment ids, pallas_gpu runs) lowers forward, dq and dk/dv
    through Pallas' Triton backend for an abstract H100 (IR lowering, not PTX compilation)."""
    def loss(q, k, v, segment_ids):
        o = dot_product_attention(q, k, v, segment_ids=segment_ids, implementation=["cudnn", "pallas_gpu"])
        return jnp.sum(o.astype(jnp.float32))

    spec = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype)
    h100 = jax.sharding.AbstractDevice("NVIDIA H100", None, "gpu")
    triton = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)
    with target_backend("gpu"), kernel_policy() as choices, jax.sharding.use_abstract_mesh(mesh):
        exported = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=["cuda"],
                                     disabled_checks=[triton])(
            spec((2, 1000, 4, 128)), spec((2, 1000, 2, 128)), spec((2, 1000, 2, 128)), spec((2, 1000), jnp.int32))
    assert choices.ran("dot_product_attention") == {"pallas_gpu"}
    assert exported.mlir_module().count("xla.gpu.triton") >= 3


def _compile_attention_grad(implementation, *, B, T, H, kv_heads, D, dtype):
    """AOT-compile q, k, v, segment_ids -> (sum(o), dq, dk, dv) for one v5e chip, with the TPU
    dispatch; returns (compiled, the kernel choices made while tracing)."""
    device = jax.sharding.SingleDeviceSharding(v5e_device())
    spec = lambda shape, dt=dtype: jax.ShapeDtypeStruct(shape, dt, sharding=device)

    def loss(q, k, v, segment_ids):
        o = dot_product_attention(q, k, v, segment_ids=segment_ids, implementation=implementation)
        return jnp.sum(o.astype(jnp.float32))

    args = (spec((B, T, H, D)), spec((B, T, kv_heads, D)), spec((B, T, kv_heads, D)), spec((B, T), jnp.int32))
    with target_backend("tpu"), kernel_policy() as choices:
        lowered = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(*args)
    return lowered.compile(), choices


@pytest.mark.tpu_compile
@pytest.mark.parametrize("T,kv_heads,D,dtype", [(1000, 2, 128, jnp.bfloat16), (512, 1, 64, jnp.float32)])
def test_splash_aot_compiles_forward_and_backward_for_v5e(T, kv_heads, D, dtype):
    """Mosaic compiles splash's forward, dq and dk/dv kernels (auto picks splash on a TPU)."""
    compiled, choices = _compile_attention_grad(None, B=2, T=T, H=4, kv_heads=kv_heads, D=D, dtype=dtype)
    assert choices.ran("dot_product_attention") == {"splash"}
    text = compiled.as_text()
    assert all(name in text for name in ("splash_mha_fwd", "splash_mha_dq", "splash_mha_dkv")), \
        sorted(set(re.findall(r"splash_mha_\w+", text)))


def _temp_bytes(implementation, **shape) -> int:
    """XLA's planned temporary bytes; a plan that does not fit the chip raises RESOURCE_EXHAUSTED
    with the bytes it needed, which are returned instead."""
    try:
        compiled, _ = _compile_attention_grad(implementation, **shape)
    except jax.errors.JaxRuntimeError as e:
        needed = re.search(r"required for HLO temporaries \(([\d.]+)([KMGT])\)", str(e))
        if "RESOURCE_EXHAUSTED" not in str(e) or not needed:
            raise
        return int(float(needed.group(1)) * 1024 ** "KMGT".index(needed.group(2)) * 1024)
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow
@pytest.mark.tpu_compile
def test_long_context_attention_memory_on_v5e():
    """configs/long_context.yaml's attention (d_model 128, 4 heads: H = Hkv = 4, D = 32, bfloat16)
    at T = 32768 on one v5e chip, batch 1, forward + backward with segment ids: splash needs at
    most 1/8 of the dense path's temporaries. Measured (jax 0.10.2, libtpu AOT): splash 171.9 MB;
    dense xla does not fit the v5e's 15.75 GiB, its plan needs 26.05 GiB = 27.97 GB (ratio 1/163)."""
    shape = dict(B=1, T=32768, H=4, kv_heads=4, D=32, dtype=jnp.bfloat16)
    fused, dense = _temp_bytes("splash", **shape), _temp_bytes("xla", **shape)
    print(f"T=32768 attention fwd+bwd temporaries on v5e: splash {fused / 1e6:.1f} MB, "
          f"xla {dense / 1e9:.2f} GB, ratio 1/{dense / fused:.0f}")
    assert 8 * fused <= dense, f"splash temp {fused} bytes > 1/8 of dense {dense} bytes"
