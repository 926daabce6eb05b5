"""Block-sparse attention under sequence parallelism on 8 fake CPU devices, in the cases the
conformance suite (test_conformance.py, sharded: every registered mixer from its tiny config) does
not build: with the inputs in zigzag order (layers/sequence_parallel/layout.py) and the mesh axis
seq splitting them, attention's sparse prefill (xattention, minference, flexprefill) and routing
attention with one local head (under tensor=2 one device holds a local and a routing head) give the
single-device output, loss and gradients of every parameter and of x (fp32, relative error <= 1e-5),
with packed segments, under meshes (data=2, seq=4) and (data=2, seq=2, tensor=2), at sparse budgets.
Also: the one-line error when the zigzag chunk is not a whole number of blocks."""

import pytest

from devices import run_with_devices

CHECK = r"""
import json, sys, time
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from hybrax.layers.sequence_parallel.layout import to_zigzag, from_zigzag

NAMES = sys.argv[1].split(",")
D, T, B = 32, 64, 2
SHAPES = dict(d_model=D, num_heads=4, num_kv_heads=2, head_dim=8, block_size=8, top_k=2, init_std=0.2)

def build(name):
    if name == "moba":
        from hybrax.layers.sparse.moba import MoBA, MoBAConfig
        return MoBA(MoBAConfig(**SHAPES), rngs=nnx.Rngs(0))
    if name == "routing_attention":
        from hybrax.layers.sparse.routing_attention import RoutingAttention, RoutingAttentionConfig
        # one local head: under tensor=2 one device holds a local and a routing head
        return RoutingAttention(RoutingAttentionConfig(**SHAPES, num_clusters=3, local_heads=1), rngs=nnx.Rngs(0))
    from hybrax.layers.softmax.attention import Attention, AttentionConfig
    selector, options = {"xattention": ("xattention", (("threshold", 0.6),)),
                         "minference": ("minference", (("last_q", 12), ("vertical_size", 6), ("slash_size", 6))),
                         "flexprefill": ("flexprefill", (("gamma", 0.6), ("js_threshold", 0.15)))}[name]
    # sparse budgets; minference's 12 last queries span two devices' chunks under seq=4; flexprefill's
    # threshold sends 3 of the 8 (row, head) pairs to the query-aware pattern, 5 to vertical-slash
    config = AttentionConfig(d_model=D, num_heads=4, num_kv_heads=2, head_dim=8, init_std=0.2, prefill_selector=selector,
                             prefill_block_size=8, prefill_options=options)
    return Attention(config, rngs=nnx.Rngs(0))

def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))

rng = np.random.default_rng(0)
x = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
noise = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
lengths = [(20, 25, 19), (40, 24)]    # packed documents; boundaries inside blocks and inside chunks
segment_ids = np.concatenate([np.concatenate([np.full(n, i + 1) for i, n in enumerate(row)])[None] for row in lengths])
positions = np.concatenate([np.concatenate([np.arange(n) for n in row])[None] for row in lengths])
segment_ids, positions = jnp.asarray(segment_ids, jnp.int32), jnp.asarray(positions, jnp.int32)

results = {}
for name in NAMES:
    graphdef, params, rest = nnx.split(build(name), nnx.Param, ...)

    def loss(params, x, segment_ids, positions, cotangent):
        y = nnx.merge(graphdef, params, rest, copy=True)(x, segment_ids=segment_ids, positions=positions)
        return jnp.sum(y * cotangent), y

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    # a cotangent along the output, so that the loss is no sum of cancelling terms (its relative error
    # would measure the cancellation, not the layer)
    (_, single_y), _ = step(params, x, segment_ids, positions, noise)
    cotangent = single_y + noise
    (single_loss, single_y), (single_dparams, single_dx) = step(params, x, segment_ids, positions, cotangent)
    for shape, axes in (((2, 4), ("data", "seq")), ((2, 2, 2), ("data", "seq", "tensor"))):
        mesh = jax.make_mesh(shape, axes, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))
        P = mesh.shape["seq"]
        zig = lambda a: to_zigzag(a, P)
        start = time.time()
        with jax.set_mesh(mesh):
            (got_loss, y), (dparams, dx) = step(params, zig(x), zig(segment_ids), zig(positions), zig(cotangent))
            text = step.lower(params, zig(x), zig(segment_ids), zig(positions), zig(cotangent)).as_text()
        errors = {"y": rel(from_zigzag(y, P), single_y), "loss": rel(got_loss, single_loss),
                  "dx": rel(from_zigzag(dx, P), single_dx)}
        for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(dparams), jax.tree.leaves(single_dparams)):
            errors["d" + jax.tree_util.keystr(path)] = rel(got, want)
        results[f"{name} {dict(zip(axes, shape))}"] = {"errors": errors, "all_gather": text.count("all_gather"),
                                                      "seconds": time.time() - start}
# MoBA at T = 48 over seq = 4: zigzag chunks of 6 tokens, not whole blocks of 8
with jax.set_mesh(jax.make_mesh((2, 4), ("data", "seq"), axis_types=(jax.sharding.AxisType.Auto,) * 2)):
    try:
        build("moba")(x[:, :48])
        results["error"] = None
    except ValueError as e:
        results["error"] = str(e)
print(json.dumps(results))
"""

NAMES = ["routing_attention", "xattention", "minference", "flexprefill"]


@pytest.mark.slow
@pytest.mark.multi_device
def test_sequence_parallel_equals_single_device():
    results = run_with_devices(CHECK.replace("sys.argv[1]", repr(",".join(NAMES))), devices=8)
    assert results.pop("error") == ("zigzag chunk length 6 (T=48 in 2 * seq=8 chunks) must be a multiple of "
                                    "block_size=8")
    assert len(results) == 2 * len(NAMES)
    for run, r in results.items():
        assert max(r["errors"].values()) <= 1e-5, (run, r)
        assert r["all_gather"] >= 2, (run, r)   # keys and values really travel
