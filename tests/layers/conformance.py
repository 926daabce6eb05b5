"""The mixer contract (docs/DESIGN.md), checked the same way for every mixer: plain functions that
take a registry name (`MIXERS`) or a `(config, module class)` pair and raise AssertionError with
the numbers when the mixer breaks the contract. tests/layers/test_conformance.py runs them over
`MIXERS.names()`, so registering a mixer is enough to have it checked.

    causal              d y_t / d x_s == 0 for every s > t (gradients), and replacing x from s on
                        leaves y before s bit-for-bit unchanged (a leak through a discrete choice,
                        which has no gradient, shows only here)
    decoding            prefill, single tokens and a chunk from the cache == the parallel form;
                        segment_ids refused while decoding
    packed_documents    a document packed after another (segment_ids, positions) == it alone
    jit_equals_eager
    parameters          config.num_params() == the module's parameter count; logical axes named
    flops               config.flops_per_token(T) against XLA's cost analysis of the forward
    sharded             (in a subprocess with 8 CPU devices: `run_sharded`) outputs, loss and every
                        gradient under meshes that split data, seq and tensor, inputs in zigzag
                        order, == one device

A subject is built from its tiny config, `config(**config.tiny).bind(TINY_SHAPE)` (a pair may
give a config class, bound the same way, or a config instance, used as it is), in evaluation mode
(routing state is not updated, nothing is reported), with every parameter moved off its
initialisation (PARAMETER_NOISE). Inputs are float32 N(0, 1) at the odd length TINY_LENGTH.
"""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hybrax.arch.registry import MIXERS
from hybrax.layers.config import TINY_SHAPE, LayerConfig, ModelShape
from hybrax.layers.sharding import RULES

TINY_LENGTH = 13          # odd: no block size, chunk or zigzag split divides it
BATCH = 2
# Row 0 of the packed check holds two documents; the second starts at DOCUMENT_START, which every
# block size of a tiny config must divide (block-sparse mixers cut blocks at row positions, so a
# document starting inside a block sees other blocks than alone).
DOCUMENT_START = 8
# prefill 5 (ends inside a block), single tokens, a chunk from inside a block across a boundary,
# single tokens into the last, partial block; and token by token from an empty cache
DECODE_CHUNKS = ((5, 1, 1, 4, 1, 1), (1,) * TINY_LENGTH)
CACHE_SLACK = 3           # the cache is longer than what is decoded: its empty rows must not count

# Tolerance of every comparison of two computations of the same function (decoding vs parallel,
# packed vs alone, jit vs eager, sharded vs one device), as max |a - b| <= TOLERANCE * max |b| per
# array. Both sides are float32 sums of the same terms in another order (chunks, scans, devices,
# fusions). Measured: <= 3e-7 in one process, <= 4e-6 across devices (gradients: linear attention's
# d x at data=2 seq=4). A real mismatch is far above: a decoded token one position late 0.2, a
# lost document boundary 1, a carried state off by 0.1% 4e-4.
TOLERANCE = 1e-5
# Parameters at initialisation hide bugs: softmax is nearly uniform and gates sit at one value
# (GLA's decay then barely differs between steps and channels, NSA's branch gates are all 1/2).
# Every parameter gets N(0, PARAMETER_NOISE^2) added (routing state is no parameter and is kept).
PARAMETER_NOISE = 0.2

# FLOPs: formula / XLA's count must lie in FLOPS_RATIO, the rule of the model-level test
# (tests/arch/test_causal_lm.py). The formulas count matmuls only; at the tiny width (32) the
# elementwise work that XLA also counts (norms, gates, rotary, masks) is 10-30% of the total, so the
# count is held at the quickstart width (ModelShape() defaults: d_model 256, 4 heads of 64) with the
# tiny settings, at the odd length and at 128 (two chunks of the linear mixers' op). Short lengths
# only: XLA counts a while loop's body once.
FLOPS_SHAPE = ModelShape()
FLOPS_LENGTHS = (TINY_LENGTH, 128)
FLOPS_RATIO = (0.9, 1.1)

# The only places where a mixer is held to less than the rules above: (mixer, check) -> (bound,
# reason). Bounds: causal_by_perturbation, the largest change allowed before s (error(), default 0:
# bit-for-bit); flops, the (low, high) ratio.
EXCEPTIONS: dict[tuple[str, str], tuple[object, str]] = {
    ("gla", "causal_by_perturbation"): (
        TOLERANCE, "the op's factored chunk form scales q and k by exp(+-m), m = half the chunk's cumulative "
                   "gate (pallas_kernels/linear_attention/xla.py), so later tokens of a chunk move earlier outputs "
                   "at rounding level (3e-7 of the output's scale); the gradient check stays exact"),
    ("slstm", "flops"): (
        (0.9, 1.6), "XLA's cost analysis counts a while loop's body once: the recurrent matmul runs once per step "
                    "inside a scan (formula / XLA 1.42 at T = 13, 1.47 at 128); with the missing iterations added "
                    "the formula is within 10% (tests/layers/test_recurrent_mixer_formulas.py)"),
}


# parameter dimensions: a name the sharding rules map, or one they leave whole
LOGICAL_AXES = set(RULES) | {"head_dim", "low_rank", "conv", None}

# The sharded check: 8 fake CPU devices, every mesh that splits seq (zigzag order), with tensor; T a
# multiple of 2 * seq * block (tiny blocks of 4), B rows over data.
SHARDED_MESHES = ({"data": 2, "seq": 4}, {"data": 2, "seq": 2, "tensor": 2})
SHARDED_LENGTH, SHARDED_BATCH = 32, 4
# documents start inside chunks, on chunk seams (multiples of 4 at seq=4, of 8 at seq=2), and as
# one-token documents; one row holds a single document
SHARDED_DOCUMENT_STARTS = ((5, 16), (3, 12, 13, 24), (), (1, 2, 8, 20, 29))


def error(a, b) -> float:
    """max |a - b| / max |b| (the measure TOLERANCE bounds)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def assert_close(got, want, what: str) -> None:
    e = error(got, want)
    assert e <= TOLERANCE, f"{what}: max |difference| = {e:.2e} of the output's scale > TOLERANCE = {TOLERANCE:g}"


# ---- subjects ------------------------------------------------------------------------------------

def resolve(subject, shape: ModelShape = TINY_SHAPE) -> tuple[LayerConfig, type]:
    """(config, module class) of a registry name or a pair; a config class is built from its tiny
    settings and bound to `shape`."""
    if isinstance(subject, str):
        entry = MIXERS.get(subject)
        subject = (entry.config, entry.module)
    config, module = subject
    if isinstance(config, type):
        config = config(**config.tiny).bind(shape)
    return config, module


def name_of(subject) -> str:
    return subject if isinstance(subject, str) else resolve(subject)[1].__name__


def bound(subject, check: str, default):
    """The subject's bound for `check` from EXCEPTIONS, else `default`."""
    return EXCEPTIONS.get((name_of(subject), check), (default, ""))[0]


@functools.cache
def build(subject):
    """The subject's module, parameters moved off their initialisation (see PARAMETER_NOISE)."""
    config, module_class = resolve(subject)
    module = module_class(config, rngs=nnx.Rngs(0))
    leaves, treedef = jax.tree.flatten(nnx.state(module, nnx.Param))
    rng = np.random.default_rng(1)
    nnx.update(module, jax.tree.unflatten(treedef, [
        jnp.asarray(np.asarray(leaf) + PARAMETER_NOISE * rng.normal(size=leaf.shape), leaf.dtype) for leaf in leaves]))
    return module


@functools.cache
def jitted(subject):
    """`module(x, segment_ids=, positions=, cache=)` under one jax.jit."""
    graphdef, state = nnx.split(build(subject))
    call = jax.jit(lambda state, x, segment_ids, positions, cache: nnx.merge(graphdef, state)(
        x, segment_ids=segment_ids, positions=positions, cache=cache))
    return lambda x, segment_ids=None, positions=None, cache=None: call(state, x, segment_ids, positions, cache)


def inputs(T: int = TINY_LENGTH, B: int = BATCH, seed: int = 0, d_model: int | None = None) -> jax.Array:
    d_model = TINY_SHAPE.d_model if d_model is None else d_model
    return jnp.asarray(np.random.default_rng(seed).normal(size=(B, T, d_model)), jnp.float32)


def width(subject) -> int:
    return resolve(subject)[0].d_model


# ---- 1. causality ----------------------------------------------------------------------------------

def causal_by_gradient(subject) -> None:
    """d (r_t . y_t) / d x_s == 0 exactly for every s > t (r_t random); and the check can see
    influence: y_t depends on x_t, and for t > 0 on some earlier x_s."""
    layer, T = jitted(subject), TINY_LENGTH
    x = inputs(B=1, seed=1, d_model=width(subject))
    r_TxD = jnp.asarray(np.random.default_rng(2).normal(size=(T, x.shape[-1])), jnp.float32)
    grad_t = lambda t: jax.grad(lambda x: jnp.vdot(layer(x)[0, t], r_TxD[t]))(x)[0]  # noqa: E731
    influence_TxS = np.abs(np.asarray(jax.jit(jax.vmap(grad_t))(jnp.arange(T)))).sum(-1)
    future = np.argwhere(np.triu(influence_TxS, k=1) > 0)
    assert not len(future), (f"{name_of(subject)}: outputs depend on later inputs through gradients, (t, s) = "
                             f"{future[:8].tolist()}, largest {np.triu(influence_TxS, k=1).max():.2e}")
    assert np.all(np.diag(influence_TxS) > 0), f"{name_of(subject)}: some y_t does not depend on x_t"
    assert np.all(np.tril(influence_TxS, k=-1)[1:].max(-1) > 0), f"{name_of(subject)}: some y_t reads no x_s, s < t"


def causal_by_perturbation(subject) -> None:
    """Replacing x from s on (fresh N(0, 2^2) values) leaves y before s bit-for-bit unchanged, for
    every s (or within EXCEPTIONS); the output at s changes."""
    layer, T, allowed = jitted(subject), TINY_LENGTH, bound(subject, "causal_by_perturbation", 0.0)
    x = np.asarray(inputs(seed=3, d_model=width(subject)))
    y = np.asarray(layer(jnp.asarray(x)))
    for s in range(1, T):
        x_changed = x.copy()
        x_changed[:, s:] = 2.0 * np.random.default_rng(s).normal(size=x_changed[:, s:].shape)
        changed = np.asarray(layer(jnp.asarray(x_changed)))
        moved = error(changed[:, :s], y[:, :s])
        assert moved <= allowed, (f"{name_of(subject)}: replacing x from s={s} on moves y before s by {moved:.2e} of "
                                  f"its scale (allowed: {allowed:g})")
        assert error(changed[:, s], y[:, s]) > 1e-3, f"{name_of(subject)}: replacing x_s leaves y_s at s={s}"


def causal(subject) -> None:
    causal_by_gradient(subject)
    causal_by_perturbation(subject)


# ---- 2.-4. decoding, packed documents, jit ---------------------------------------------------------

def decoding(subject) -> None:
    """For each schedule of DECODE_CHUNKS: the outputs of the chunks, fed in turn with the cache
    from init_cache(B, T + CACHE_SLACK), equal the parallel forward's. Decoding with segment_ids
    is refused with a one-line ValueError that names them."""
    layer, module = jitted(subject), build(subject)
    x = inputs(seed=4, d_model=width(subject))
    full = layer(x)
    for chunks in DECODE_CHUNKS:
        cache, outputs, start = module.init_cache(BATCH, TINY_LENGTH + CACHE_SLACK), [], 0
        for n in chunks:
            y, cache = layer(x[:, start:start + n], cache=cache)
            outputs.append(y)
            start += n
        assert_close(jnp.concatenate(outputs, axis=1), full, f"{name_of(subject)}: decoding in chunks {chunks}")
    try:
        layer(x[:, :3], segment_ids=jnp.ones((BATCH, 3), jnp.int32), cache=module.init_cache(BATCH, 3))
    except ValueError as refusal:
        assert "segment_ids" in str(refusal) and "\n" not in str(refusal), f"{name_of(subject)}: {refusal!r}"
    else:
        raise AssertionError(f"{name_of(subject)}: decoding with segment_ids is not refused")


def packed_documents(subject) -> None:
    """Row 0 packs documents [0, DOCUMENT_START) and [DOCUMENT_START, T) (positions restart), row 1
    holds one; each gives what it gives alone."""
    layer, T, start = jitted(subject), TINY_LENGTH, DOCUMENT_START
    x = inputs(seed=5, d_model=width(subject))
    segment_ids = jnp.asarray([[1] * start + [2] * (T - start), [7] * T], jnp.int32)
    positions = jnp.asarray([list(range(start)) + list(range(T - start)), list(range(T))], jnp.int32)
    y = layer(x, segment_ids=segment_ids, positions=positions)
    what = f"{name_of(subject)}: packed document"
    assert_close(y[0, :start], layer(x[:1, :start])[0], what + " [0, start)")
    assert_close(y[0, start:], layer(x[:1, start:])[0], what + " [start, T)")
    assert_close(y[1], layer(x[1:])[0], what + " alone in its row")


def jit_equals_eager(subject) -> None:
    x = inputs(seed=6, d_model=width(subject))
    assert_close(jitted(subject)(x), build(subject)(x), f"{name_of(subject)}: jit vs eager")


# ---- 5.-6. budgets -------------------------------------------------------------------------------

def parameters(subject) -> None:
    """config.num_params() == the module's parameter count, and every parameter names each of its
    dimensions with a logical axis that the sharding rules know (or leave unsharded by name)."""
    config = resolve(subject)[0]
    flat = nnx.to_flat_state(nnx.state(build(subject), nnx.Param))
    real = sum(variable[...].size for _, variable in flat)
    assert config.num_params() == real, f"{name_of(subject)}: num_params() = {config.num_params()}, module has {real}"
    for path, variable in flat:
        axes = variable.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == variable[...].ndim and set(axes) <= LOGICAL_AXES, (
            f"{name_of(subject)}: parameter {'/'.join(map(str, path))} {variable[...].shape} has logical axes {axes}; "
            f"known: {sorted(map(str, LOGICAL_AXES))}")


def xla_flops_per_token(config: LayerConfig, module_class: type, T: int, B: int = 2) -> float:
    """XLA's cost analysis of one jitted forward over [B, T, d_model] zeros, per token (shapes only:
    nothing is built)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: module_class(config, rngs=nnx.Rngs(0))))
    x = jax.ShapeDtypeStruct((B, T, config.d_model), jnp.float32)
    analysis = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, x).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return analysis["flops"] / (B * T)


def flops(subject) -> None:
    config, module_class = resolve(subject, FLOPS_SHAPE)
    low, high = bound(subject, "flops", FLOPS_RATIO)
    for T in FLOPS_LENGTHS:
        formula, xla = config.flops_per_token(T), xla_flops_per_token(config, module_class, T)
        assert low <= formula / xla <= high, (f"{name_of(subject)}: flops_per_token({T}) = {formula:,} vs XLA "
                                              f"{xla:,.0f} (ratio {formula / xla:.3f}, allowed [{low}, {high}])")


# ---- 7. sharded == one device (run in a subprocess with 8 devices) ----------------------------------

def _packed(starts) -> np.ndarray:
    return np.cumsum(np.isin(np.arange(SHARDED_LENGTH), starts)).astype(np.int32)


def sharded_errors(subject) -> dict[str, dict[str, float]]:
    """{mesh: {quantity: error}} of value_and_grad of sum(y * cotangent) w.r.t. every parameter and
    x, under each of SHARDED_MESHES (parameters split by their logical axes, inputs in zigzag order)
    against one device. Needs 8 devices (`run_sharded`)."""
    from jax.sharding import NamedSharding

    from hybrax.layers.sequence_parallel.layout import from_zigzag, to_zigzag
    from hybrax.layers.sharding import spec
    from hybrax.train.sharding import state_shardings

    graphdef, params, rest = nnx.split(build(subject), nnx.Param, ...)
    segment_ids = np.stack([_packed(starts) for starts in SHARDED_DOCUMENT_STARTS])
    starts = np.maximum.accumulate(np.where(np.diff(segment_ids, prepend=-1, axis=1) != 0,
                                            np.arange(SHARDED_LENGTH), 0), axis=1)
    positions = (np.arange(SHARDED_LENGTH) - starts).astype(np.int32)
    rng = np.random.default_rng(7)
    x, noise = (rng.normal(size=(SHARDED_BATCH, SHARDED_LENGTH, width(subject))).astype(np.float32) for _ in "xn")

    def loss(params, x, segment_ids, positions, cotangent):
        y = nnx.merge(graphdef, params, rest, copy=True)(x, segment_ids=segment_ids, positions=positions)
        return jnp.sum(y * cotangent), y

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    # a cotangent along the output, so that the loss is no sum of cancelling terms
    cotangent = np.asarray(step(params, x, segment_ids, positions, noise)[0][1]) + noise
    (loss0, y0), (dparams0, dx0) = step(params, x, segment_ids, positions, cotangent)
    results = {}
    for axes in SHARDED_MESHES:
        mesh = jax.make_mesh(tuple(axes.values()), tuple(axes), axis_types=(jax.sharding.AxisType.Auto,) * len(axes))
        P = axes["seq"]
        with jax.set_mesh(mesh):
            def put(a, names):
                return jax.device_put(to_zigzag(a, P), NamedSharding(mesh, spec(names, a.shape)))
            sharded_params = jax.device_put(params, state_shardings(params, mesh))
            (loss1, y1), (dparams1, dx1) = step(sharded_params, put(x, ("batch", "length", None)),
                                                put(segment_ids, ("batch", "length")),
                                                put(positions, ("batch", "length")),
                                                put(cotangent, ("batch", "length", None)))
        errors = {"loss": error(loss1, loss0), "y": error(from_zigzag(np.asarray(y1), P), y0),
                  "d x": error(from_zigzag(np.asarray(dx1), P), dx0)}
        for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(dparams1), jax.tree.leaves(dparams0)):
            errors["d" + jax.tree_util.keystr(path)] = error(got, want)
        results[" ".join(f"{k}={v}" for k, v in axes.items())] = errors
    return results


HERE = pathlib.Path(__file__).resolve().parent


def run_sharded(names, setup: str = "", timeout: int = 600) -> dict[str, dict[str, dict[str, float]]]:
    """{name: sharded_errors(name)} for registry names, in one subprocess with 8 CPU devices.
    `setup` is Python run there first (e.g. registering a mixer defined in a test file)."""
    from devices import run_with_devices

    code = "\n".join([f"import json, sys; sys.path.insert(0, {str(HERE)!r})", "import conformance", setup,
                      f"print(json.dumps({{name: conformance.sharded_errors(name) for name in {list(names)!r}}}))"])
    return run_with_devices(code, devices=8, timeout=timeout)


def assert_sharded(name: str, results: dict[str, dict[str, float]]) -> None:
    assert len(results) == len(SHARDED_MESHES), (name, list(results))
    for mesh, errors in results.items():
        assert len(errors) > 3, (name, mesh, errors)
        worst = max(errors, key=errors.get)
        assert errors[worst] <= TOLERANCE, (f"{name} under {mesh}: {worst} differs from one device by "
                                            f"{errors[worst]:.2e} of its scale > TOLERANCE = {TOLERANCE:g}; "
                                            f"all: {errors}")


CHECKS = {"causal": causal, "decoding": decoding, "packed_documents": packed_documents,
          "jit_equals_eager": jit_equals_eager, "parameters": parameters, "flops": flops}


def check_all(subject) -> None:
    """Every in-process check (all but `sharded`)."""
    for check in CHECKS.values():
        check(subject)

