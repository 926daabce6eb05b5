"""The Pallas GPU (Triton) kernels of block_sparse_attention (gpu.py, gpu_backward.py).

- every shared case (`block_sparse_attention_cases.CASES`) in interpret mode on a CPU (compiled on
  a GPU; refused on purpose on a TPU, `REFUSED`) against the dense float32 reference: output and dq, dk, dv (float32 1e-5, bfloat16 2e-2). The kernel is jitted here
  (one compilation per case instead of one per eager op); one case also goes through the public
  api eagerly, loading gpu.py lazily;
- block sizes and a head dim that are not powers of two (the kernels' blocks are padded to 32, 64,
  64: masked rows, zero channels);
- the list preprocessing against a plain Python loop (dedupe, -1, causal pruning, inverse lists);
- the Pallas -> Triton lowering of forward and backward for an abstract H100 (no GPU needed; this
  checks Pallas' lowering to Triton IR, not Triton's compilation to PTX).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from block_sparse_attention_cases import CASES, REFUSED, Case, assert_matches_reference
from hybrax.pallas_kernels.block_sparse_attention import api, gpu
from hybrax.pallas_kernels.block_sparse_attention.gpu_backward import inverse_lists
from refusals import expect_refusal_or_run

jitted_kernel = jax.jit(gpu.block_sparse_attention, static_argnames=("block_size", "causal", "scale"))


@pytest.mark.parametrize("case", CASES + [Case(70, block_q=24, block_k=40, D=40, lists="causal_random",
                                               segments=True, B=1)], ids=lambda case: case.id)
def test_interpret_mode_matches_reference(monkeypatch, case):
    monkeypatch.setitem(api.IMPLEMENTATIONS, "pallas_gpu", jitted_kernel)
    expect_refusal_or_run(REFUSED, "pallas_gpu", case, lambda: assert_matches_reference("pallas_gpu", case))


def test_eager_call_through_the_api_matches_reference():
    case = CASES[3]  # packed segments, causal random lists
    expect_refusal_or_run(REFUSED, "pallas_gpu", case, lambda: assert_matches_reference("pallas_gpu", case))


def test_lists_are_deduplicated_pruned_and_inverted():
    rng = np.random.default_rng(0)
    block_q, block_k, T, S = 32, 16, 100, 100
    nq, nk = -(-T // block_q), -(-S // block_k)
    raw = rng.integers(-1, nk, (2, 3, nq, 6)).astype(np.int32)
    config = gpu.Config(2, 3, 3, T, S, block_q, block_k, 32, 16, 16, True, 1.0, False, True)
    lists, counts = map(np.asarray, gpu.prepare_lists(jnp.asarray(raw), config))
    inverse, inverse_counts = map(np.asarray, inverse_lists(jnp.asarray(lists), nk))
    want_inverse = [[[[] for _ in range(nk)] for _ in range(3)] for _ in range(2)]
    for b, h, n in np.ndindex(2, 3, nq):
        last_row = min(n * block_q + block_q, T) - 1
        want = sorted({int(m) for m in raw[b, h, n] if m >= 0 and m * block_k <= last_row})
        assert counts[b, h, n] == len(want)
        assert list(lists[b, h, n]) == want + [-1] * (6 - len(want))
        for m in want:
            want_inverse[b][h][m].append(n)
    for b, h, m in np.ndindex(2, 3, nk):
        want = want_inverse[b][h][m]
        assert inverse_counts[b, h, m] == len(want)
        assert list(inverse[b, h, m]) == want + [-1] * (nq - len(want))


def _loss(q, k, v, block_indices, segment_ids):
    o = gpu.block_sparse_attention_kernel(q, k, v, block_indices, block_size=(64, 64), causal=True,
                                          scale=q.shape[-1] ** -0.5, segment_ids=segment_ids,
                                          interpret=False)
    return jnp.sum(o.astype(jnp.float32))


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
@pytest.mark.parametrize("dtype,D,segments", [(jnp.float32, 64, True), (jnp.float32, 128, False),
                                              (jnp.bfloat16, 64, False), (jnp.bfloat16, 128, True),
                                              (jnp.float16, 128, False)])
def test_gpu_lowers_to_triton(dtype, D, segments):
    """Forward, dq and dk/dv kernels lower through Pallas' Triton backend for an (abstract) H100."""
    B, T, H, Hkv = 1, 256, 4, 2
    spec = jax.ShapeDtypeStruct
    args = (spec((B, T, H, D), dtype), spec((B, T, Hkv, D), dtype), spec((B, T, Hkv, D), dtype),
            spec((B, H, T // 64, 3), jnp.int32), spec((B, T), jnp.int32) if segments else None)
    h100 = jax.sharding.AbstractDevice("NVIDIA H100", None, "gpu")
    triton = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)):
        exported = jax.export.export(jax.jit(jax.grad(_loss, argnums=(0, 1, 2))), platforms=["cuda"],
                                     disabled_checks=[triton])(*args)
    module = exported.mlir_module()
    assert module.count("xla.gpu.triton") == 3  # forward, dq, dk/dv
    assert "grid_x = 4 : i32, grid_y = 4" in module  # forward / dq grid (B H, Nq)
    assert "grid_x = 2 : i32, grid_y = 4" in module  # dk/dv grid (B Hkv, Nk)
