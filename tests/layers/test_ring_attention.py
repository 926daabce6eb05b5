"""Ring attention (sequence parallelism for softmax attention) on 8 fake CPU devices, fp32:

- the op: `ring_attention` in zigzag order == `dot_product_attention(causal=True, segment_ids)`
  (reference implementation) in natural order, outputs and dq, dk, dv (relative error <= 1e-5), with
  the jnp block (what auto runs on a CPU; the splash block: test_ring_attention_splash.py), with
  grouped-query heads and packed segments whose boundaries fall inside chunks and on chunk seams,
  under meshes seq=8, (data=2, seq=4), (data=2, seq=2, tensor=2) and (seq=2, tensor=4);
- the Attention layer: one jitted value_and_grad, single device in natural order == sharded run on
  zigzag-permuted inputs, for the output, the loss and every gradient (params and x);
- the compiled forward + backward moves key/value blocks with collective-permutes and never
  all-gathers them (the full sequence is never on one device);
- a length that is not a multiple of 2 * seq fails with a one-line error;
- load balance: with P = 4 the zigzag order gives every device 9 unmasked (query chunk, key chunk)
  pairs of the causal mask; the natural contiguous order gives 3, 7, 11, 15, so its busiest device
  does 15 / 9 = 1.67x the zigzag work (one step of the ring waits for the busiest device).
"""

import numpy as np
import pytest

from hybrax.layers.sequence_parallel.layout import zigzag_order

from devices import run_with_devices

COMMON = r"""
import json, re
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding
from hybrax.layers.sequence_parallel.layout import to_zigzag, from_zigzag

MESHES = [((8,), ("seq",)), ((2, 4), ("data", "seq")), ((2, 2, 2), ("data", "seq", "tensor"))]

def make_mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))

def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))

def collectives(hlo):
    return {"collective_permute": len(re.findall(r"collective-permute(?:-start)?\(", hlo)),
            "all_gather": len(re.findall(r"all-gather(?:-start)?\(", hlo))}

def packed_segments(B, T, rng):
    # boundaries on chunk seams (multiples of T/16, T/8, T/4) and inside chunks
    cuts = [[], [2, 5, 13, 20], [8, 16, 24], [1, 4, 7, 9, 30]]
    seg = np.zeros((B, T), np.int32)
    for b in range(B):
        for c in cuts[b % len(cuts)]:
            seg[b, c:] += 1
    return seg

def one_line_error(call):
    try:
        call()
    except ValueError as e:
        return str(e)
    return None
"""

OP_CHECK = COMMON + r"""
from hybrax.layers.softmax.ring_attention import ring_attention, BLOCK_OP
from hybrax.pallas_kernels.implementation import kernel_policy
from hybrax.pallas_kernels.dot_product_attention import dot_product_attention

B, T, H, Hkv, D = 4, 32, 4, 2, 8
keys = jax.random.split(jax.random.key(0), 4)
q = jax.random.normal(keys[0], (B, T, H, D))
k, v = (jax.random.normal(key, (B, T, Hkv, D)) for key in keys[1:3])
do = jax.random.normal(keys[3], (B, T, H, D))
seg = jnp.asarray(packed_segments(B, T, None))

def with_grads(attend):
    def run(q, k, v, seg, do):
        o, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, seg), q, k, v)
        return (o, *vjp(do))
    return jax.jit(run)

reference = with_grads(lambda q, k, v, seg: dot_product_attention(q, k, v, causal=True, segment_ids=seg,
                                                                  implementation="reference"))
ring = with_grads(lambda q, k, v, seg: ring_attention(q, k, v, segment_ids=seg))
want = reference(q, k, v, seg, do)
results = {}
# the last mesh splits the 4 query heads but not the 2 key/value heads over tensor=4: heads stay whole
for shape, names in MESHES + [((2, 4), ("seq", "tensor"))]:
    P = dict(zip(names, shape))["seq"]
    args = [to_zigzag(x, P) for x in (q, k, v, seg, do)]
    with jax.set_mesh(make_mesh(shape, names)), kernel_policy() as choices:
        got = ring(*args)
        hlo = ring.lower(*args).compile().as_text()
    errors = {name: rel(from_zigzag(a, P), b) for name, a, b in zip(("o", "dq", "dk", "dv"), got, want)}
    results[str(dict(zip(names, shape)))] = {"errors": errors, "block": sorted(choices.ran(BLOCK_OP)),
                                             **collectives(hlo)}
with jax.set_mesh(make_mesh((8,), ("seq",))):
    results["bad_length"] = one_line_error(lambda: ring_attention(q[:, :24], k[:, :24], v[:, :24]))
print(json.dumps(results))
"""

LAYER_CHECK = COMMON + r"""
from flax import nnx
from hybrax.layers.softmax.attention import Attention, AttentionConfig
from hybrax.layers.sharding import spec

B, T = 4, 32
layer = Attention(AttentionConfig(d_model=32, num_heads=4, num_kv_heads=2, head_dim=8), rngs=nnx.Rngs(0))
graphdef, params = nnx.split(layer, nnx.Param)
rng = np.random.default_rng(0)
x = rng.normal(size=(B, T, 32)).astype(np.float32)
cot = rng.normal(size=(B, T, 32)).astype(np.float32)
seg = packed_segments(B, T, rng)
pos = np.stack([np.arange(T) - np.searchsorted(row, row, side="left") for row in seg]).astype(np.int32)

def loss(params, x, seg, pos, cot):
    y = nnx.merge(graphdef, params)(x, segment_ids=seg, positions=pos)
    return jnp.sum(y * cot), y

step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
(want_loss, want_y), (want_dparams, want_dx) = step(params, x, seg, pos, cot)

def put(mesh, value, names):
    return jax.device_put(value, NamedSharding(mesh, spec(names, value.shape, mesh)))

def shard_params(mesh, params):
    def one(var):
        return var.replace(put(mesh, var[...], var.get_metadata()["out_sharding"]))
    return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))

results = {}
for shape, names in (MESHES[0], MESHES[2]):
    P = dict(zip(names, shape))["seq"]
    mesh = make_mesh(shape, names)
    rows = ("batch", "length")
    args = (shard_params(mesh, params), put(mesh, to_zigzag(x, P), rows + (None,)), put(mesh, to_zigzag(seg, P), rows),
            put(mesh, to_zigzag(pos, P), rows), put(mesh, to_zigzag(cot, P), rows + (None,)))
    with jax.set_mesh(mesh):
        (got_loss, got_y), (got_dparams, got_dx) = step(*args)
        hlo = step.lower(*args).compile().as_text()
    errors = {"loss": rel(got_loss, want_loss), "y": rel(from_zigzag(np.asarray(got_y), P), want_y),
              "dx": rel(from_zigzag(np.asarray(got_dx), P), want_dx)}
    for (path, a), (_, b) in zip(nnx.to_flat_state(got_dparams), nnx.to_flat_state(want_dparams), strict=True):
        errors["d" + "/".join(map(str, path))] = rel(a[...], b[...])
    results[str(dict(zip(names, shape)))] = {"errors": errors, **collectives(hlo)}
with jax.set_mesh(mesh):
    results["bad_length"] = one_line_error(lambda: nnx.merge(graphdef, params)(x[:, :10]))
print(json.dumps(results))
"""


def check_results(results, meshes, bad_length):
    assert results.pop("bad_length") == bad_length
    assert sorted(results) == sorted(meshes)
    for mesh, r in results.items():
        assert max(r["errors"].values()) <= 1e-5, (mesh, r)
        assert r["collective_permute"] >= 5, (mesh, r)   # k, v, segment ids forward; and dk, dv backward
        assert r["all_gather"] == 0, (mesh, r)           # nothing gathers the sequence


@pytest.mark.multi_device
def test_ring_attention_equals_dense_attention():
    results = run_with_devices(OP_CHECK, devices=8, timeout=120)
    check_results(results, ["{'seq': 8}", "{'data': 2, 'seq': 4}", "{'data': 2, 'seq': 2, 'tensor': 2}",
                            "{'seq': 2, 'tensor': 4}"],
                  "sequence length 24 must be a multiple of 2 * seq = 16 to split over the mesh axis seq=8 in "
                  "zigzag order")
    for r in results.values():
        assert set(r["errors"]) == {"o", "dq", "dk", "dv"}
        assert r["block"] == ["xla"], r   # auto on a CPU: the jnp block


@pytest.mark.multi_device
def test_attention_layer_sequence_parallel_equals_single_device():
    results = run_with_devices(LAYER_CHECK, devices=8, timeout=120)
    check_results(results, ["{'seq': 8}", "{'data': 2, 'seq': 2, 'tensor': 2}"],
                  "sequence length 10 must be a multiple of 2 * seq = 4 to split over the mesh axis seq=2 in "
                  "zigzag order")
    for r in results.values():
        assert {"loss", "y", "dx"} < set(r["errors"]) and len(r["errors"]) == 7, r   # and w_q, w_k, w_v, w_o


def unmasked_chunk_pairs(order: np.ndarray, num_devices: int) -> list[int]:
    """Per device: (query chunk, key chunk) pairs of the 2P chunks of the causal square that are not
    entirely in the future (key chunk <= query chunk), for tokens stored in `order`."""
    T = len(order)
    chunk = order // (T // (2 * num_devices))
    counts = []
    for rows in np.split(chunk, num_devices):
        query_chunks = np.unique(rows)
        counts.append(int(sum(np.sum(np.arange(2 * num_devices) <= qc) for qc in query_chunks)))
    return counts


def test_zigzag_balances_the_causal_work():
    P, T = 4, 64
    zigzag = unmasked_chunk_pairs(zigzag_order(T, P), P)
    natural = unmasked_chunk_pairs(np.arange(T), P)
    assert zigzag == [2 * P + 1] * P == [9, 9, 9, 9]
    assert natural == [3, 7, 11, 15]
    assert sum(zigzag) == sum(natural) == 2 * P * (2 * P + 1) // 2
    assert max(natural) / max(zigzag) == pytest.approx(15 / 9)
