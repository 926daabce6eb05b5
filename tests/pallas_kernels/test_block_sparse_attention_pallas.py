"""The Pallas TPU kernels of block_sparse_attention (pallas_kernels/block_sparse_attention/tpu.py,
tpu_backward.py); the GPU kernels have their own file.

- every shared case (block_sparse_attention_cases.CASES: T = 1, 63, 65, 257, unequal blocks, GQA,
  S != T, packed segments, empty rows, duplicates, bf16) against the dense reference, output and
  dq, dk, dv, in interpret mode on the CPU;
- two cases under the TPU-semantics interpreter (`pltpu.InterpretParams`: DMAs, semaphores);
- the scalar-prefetched schedules obey their law: forward slot codes name exactly the listed, not
  entirely future, deduplicated blocks, empty slots repeat the previous block (no new DMA), and
  the dk/dv schedule holds exactly the same (query, key block) pairs grouped by key block;
- Mosaic compilation for a TPU v5e topology through libtpu (`tpu_compile`): forward + backward,
  D = 128, blocks (128, 128), float32 and bfloat16, with and without segments, causal, GQA.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from block_sparse_attention_cases import CASES, REFUSED, Case, assert_matches_reference
from hybrax.pallas_kernels.block_sparse_attention import tpu
from refusals import expect_refusal_or_run
from tpu_topology import v5e_device


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_matches_reference(case):
    expect_refusal_or_run(REFUSED, "pallas_tpu", case, lambda: assert_matches_reference("pallas_tpu", case))


# On a TPU or GPU the kernels run compiled: the interpreter's CPU check has nothing to add there.
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the TPU-semantics interpreter is a CPU check")
@pytest.mark.parametrize("case", [Case(40, lists="causal_random", segments=True, B=1),
                                  Case(33, causal=False, dtype="bfloat16", B=1, H=2, Hkv=1)],
                         ids=lambda case: case.id)
def test_tpu_semantics_interpreter_matches_reference(monkeypatch, case):
    monkeypatch.setattr(tpu, "INTERPRET", pltpu.InterpretParams())
    assert_matches_reference("pallas_tpu", case)


def _config(T, S, block_q, block_k, n_sel, causal, B=2, H=4, Hkv=2):
    return tpu.Config(B, H, Hkv, T, S, 8, block_q, block_k, n_sel, causal, 1.0, False, True, "float32")


@pytest.mark.parametrize("causal", [True, False])
def test_prefetched_schedules_obey_their_law(causal):
    """T = 70, S = 90, blocks (16, 8): 5 query blocks, 12 key blocks, 6 slots with -1 and repeats.
    Forward slots name exactly the listed, deduplicated, not entirely future blocks (ascending);
    an empty slot repeats the block before it (no DMA). The dk/dv schedule holds exactly the
    (query head, query block, key block) triples of the forward, each key block in one run
    flagged first / last, and unused pairs repeat the last used one."""
    config = _config(70, 90, 16, 8, 6, causal)
    rng = np.random.default_rng(0)
    lists = rng.integers(-1, config.num_kv_blocks, (2, 4, config.num_q_blocks, 6)).astype(np.int32)
    lists[:, :, ::2, 1] = lists[:, :, ::2, 0]
    lists[1, 2:] = -1  # key/value head 1 of batch 1: no query head lists anything
    codes, (key, query, flags) = jax.jit(
        lambda x: (lambda c: (c, tpu.key_major_pairs(c, config)))(tpu.forward_lists(x, config)))(jnp.asarray(lists))
    codes, key, query, flags = map(np.asarray, (codes, key, query, flags))
    G, nq = config.groups, config.num_q_blocks
    triples = set()
    for b, h, n in np.ndindex(*codes.shape[:3]):
        wanted = {int(m) for m in lists[b, h, n] if m >= 0 and (not causal or m * 8 <= n * 16 + 15)}
        row = codes[b, h, n]
        used = [int(c) for c in row if c >= 0]
        assert sorted(used) == used and set(used) == wanted and len(used) == len(wanted)
        fetched = np.where(row >= 0, row, -1 - row)
        for j in range(1, len(row)):
            assert row[j] >= 0 or fetched[j] == fetched[j - 1]
        triples |= {(b, h // G, (h % G) * nq + n, m) for m in used}
    got = set()
    for b, kh in np.ndindex(*key.shape[:2]):
        used = flags[b, kh] & 1 == 1
        count = int(used.sum())
        assert used[:count].all() and not used[count:].any()
        k_used = key[b, kh, :count]
        assert np.all(np.diff(k_used) >= 0)
        run_ends = k_used[1:] != k_used[:-1]
        np.testing.assert_array_equal(flags[b, kh, :count] & 2 == 2, np.r_[True, run_ends][:count])
        np.testing.assert_array_equal(flags[b, kh, :count] & 4 == 4, np.r_[run_ends, True][:count])
        last = (key[b, kh, count - 1], query[b, kh, count - 1]) if count else (0, 0)
        assert np.all(key[b, kh, count:] == last[0]) and np.all(query[b, kh, count:] == last[1])
        got |= {(b, kh, int(qq), int(m)) for m, qq in zip(k_used, query[b, kh, :count])}
    assert got == triples


@pytest.mark.tpu_compile
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("segments", [False, True], ids=["dense", "segments"])
def test_tpu_aot_compile_forward_and_backward(dtype, segments):
    """Mosaic compiles forward, dq and dk/dv for D = 128, blocks (128, 128), causal, H = 4 over
    Hkv = 2, T = 512 with 3 listed blocks per query block, on a v5e topology (no TPU needed)."""
    B, T, H, Hkv, D, n_sel = 1, 512, 4, 2, 128, 3
    sharding = jax.sharding.SingleDeviceSharding(v5e_device())
    spec = lambda shape, dt=dtype: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
    args = (spec((B, T, H, D)), spec((B, T, Hkv, D)), spec((B, T, Hkv, D)),
            spec((B, H, T // 128, n_sel), jnp.int32), spec((B, T), jnp.int32) if segments else None)

    def loss(q, k, v, block_indices, segment_ids):
        o = tpu.block_sparse_attention(q, k, v, block_indices, block_size=(128, 128), causal=True,
                                       scale=D ** -0.5, segment_ids=segment_ids, interpret=False)
        return jnp.sum(o.astype(jnp.float32))

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile().as_text()
    for kernel in ["block_sparse_attention_fwd", "block_sparse_attention_bwd_dq", "block_sparse_attention_bwd_dkv"]:
        assert kernel in compiled


def test_tpu_block_sizes_off_the_mosaic_tiling_fall_through():
    """On a TPU (interpret=False), blocks that are not whole sublane tiles raise NotImplementedError
    (so the api falls through to xla) before anything reaches Mosaic."""
    q = jnp.zeros((1, 48, 2, 128), jnp.bfloat16)
    block_indices = jnp.zeros((1, 2, 2, 1), jnp.int32)
    with pytest.raises(NotImplementedError, match=r"block_size=\(24, 24\) in multiples of 16 for bfloat16"):
        tpu.block_sparse_attention(q, q, q, block_indices, block_size=(24, 24), causal=True, scale=1.0,
                                   segment_ids=None, interpret=False)
