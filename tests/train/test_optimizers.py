"""The memory-efficient optimizers (train/optimizers/) against laws and independent references:

- adamw8bit's first 20 updates track float32 AdamW's on the same gradients;
- GaLore at full rank with a fixed subspace is AdamW in the subspace's rotated coordinates, and
  its non-matrix parameters get exactly AdamW; Natural GaLore's Woodbury step equals the dense
  inverse of the empirical Fisher in float64;
- FRUGAL with every column state-full is AdamW, with none (and the rest state-free) signSGD or SGD;
- state bytes per parameter, exact from the state tree; bad knobs are one-line config errors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from hybrax.train.config import ConfigError, load_config
from hybrax.train.optim import learning_rate_schedule, make_optimizer, state_bytes
from hybrax.train.optimizers.galore import natural_gradient
from hybrax.train.optimizers.parameters import matrix_view, parameter_leaves
from hybrax.train.optimizers.subspace import Subspace
from hybrax.train.step import abstract_state, create_model

SMALL = ["model.num_layers=1", "model.d_model=64", "model.num_heads=2", "optim.grad_clip=0", "optim.warmup_steps=0"]


def _config(*overrides, preset="quickstart.yaml"):
    return load_config(preset, SMALL + list(overrides))


def _params():
    return nnx.state(create_model(_config().model, 0), nnx.Param)


def _gradients(params, step):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(step), len(leaves))
    return jax.tree.unflatten(treedef, [0.01 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def _updates(config, steps, params=None):
    """Each step's updates (a list of leaf arrays) for the same gradient sequence."""
    params = _params() if params is None else params
    optimizer = make_optimizer(config.optim, 100)
    state, out = optimizer.init(params), []
    update = jax.jit(optimizer.update)
    for step in range(steps):
        updates, state = update(_gradients(params, step), state, params)
        params = optax.apply_updates(params, updates)
        out.append([np.asarray(u) for u in jax.tree.leaves(updates)])
    return out


def _relative(a, b) -> float:
    """The largest over steps of |update - reference| / |reference|, norms over all parameters."""
    return max(np.sqrt(sum(np.sum((x - y) ** 2) for x, y in zip(xs, ys)) / sum(np.sum(y ** 2) for y in ys))
               for xs, ys in zip(a, b))


def test_adamw8bit_tracks_float32_adamw_for_20_updates():
    reference = _updates(_config(), 20)
    ours = _updates(_config("optim.name=adamw8bit", "optim.adamw8bit.min_size=0"), 20)
    errors = [_relative([a], [b]) for a, b in zip(ours, reference)]
    assert max(errors) < 0.05, errors


def test_adamw8bit_stores_uint8_codes_and_keeps_small_parameters_in_32_bits():
    config = _config("optim.name=adamw8bit")
    state = make_optimizer(config.optim, 10).init(_params())[1]
    leaves, _ = parameter_leaves(state.per_param)
    kinds = {path.rsplit("/", 1)[0]: v.get_value().dtype for path, v in leaves if path.endswith("_codes") or
             path.endswith("/mu")}
    assert kinds["blocks/0/ffn/w_up"] == np.uint8 and kinds["blocks/0/ffn_norm/scale"] == np.float32


def test_galore_at_full_rank_with_a_fixed_subspace_is_adamw_in_rotated_coordinates():
    """P fitted on the first gradient and kept (update_interval > steps): each matrix's update is
    P . AdamW(P^T g) (scale 1); vectors and the embedding get plain AdamW."""
    config = _config("optim.name=galore", "optim.galore.rank_fraction=1", "optim.galore.update_interval=1000",
                     "optim.galore.scale=1", "optim.weight_decay=0")
    params = _params()
    ours = _updates(config, 4, params)
    adam = optax.adam(learning_rate_schedule(config.optim, 100), b1=config.optim.beta1, b2=config.optim.beta2,
                      eps=config.optim.eps)
    leaves, _ = parameter_leaves(params)
    subspaces = [None if matrix_view(v) is None else Subspace(matrix_view(v), min(matrix_view(v).m, matrix_view(v).n))
                 for _, v in leaves]
    first = jax.tree.leaves(_gradients(params, 0))
    projectors = [None if s is None else s.fit(g) for s, g in zip(subspaces, first)]
    low = [g if s is None else s.down(p, g) for s, p, g in zip(subspaces, projectors, first)]
    state = adam.init(low)
    for step in range(4):
        grads = jax.tree.leaves(_gradients(params, step))
        low = [g if s is None else s.down(p, g) for s, p, g in zip(subspaces, projectors, grads)]
        directions, state = adam.update(low, state)
        expected = [d if s is None else s.up(p, d) for s, p, d in zip(subspaces, projectors, directions)]
        for (path, _), got, want in zip(leaves, ours[step], expected):
            error = np.linalg.norm(got - np.asarray(want)) / np.linalg.norm(want)
            assert error < 1e-5, (path, step, error)


def test_natural_galore_step_is_the_dense_inverse_fisher():
    rng = np.random.default_rng(0)
    history = rng.standard_normal((4, 3, 8, 5)).astype(np.float32)   # s=4, a batch of 3 matrices of 8 x 5
    x = history[0]
    ours = np.asarray(natural_gradient(jnp.asarray(x), jnp.asarray(history), 0.5, batch=1))
    for b in range(3):
        g = history[:, b].reshape(4, -1).astype(np.float64)
        lam = 0.5 * np.sum(g * g) / 4
        fisher = lam * np.eye(g.shape[1]) + g.T @ g
        want = lam * np.linalg.solve(fisher, x[b].reshape(-1).astype(np.float64))
        np.testing.assert_allclose(ours[b].reshape(-1), want, rtol=1e-4, atol=1e-6)


def test_frugal_with_every_column_state_full_is_adamw():
    reference = _updates(_config(), 5)
    ours = _updates(_config("optim.name=frugal", "optim.frugal.density=1", "optim.frugal.update_interval=1000"), 5)
    assert _relative(ours, reference) < 1e-5


@pytest.mark.parametrize("rule", ["sign", "sgd"])
def test_frugal_with_nothing_state_full_is_the_state_free_rule(rule):
    config = _config("optim.name=frugal", "optim.frugal.density=0", "optim.frugal.rest=state_free",
                     f"optim.frugal.state_free={rule}", "optim.frugal.state_free_lr=0.5")
    params, schedule = _params(), learning_rate_schedule(config.optim, 100)
    ours = _updates(config, 3, params)
    for step in range(3):
        expected = []
        for g, p in zip(jax.tree.leaves(_gradients(params, step)), jax.tree.leaves(params)):
            direction = 0.5 / config.optim.lr * (np.sign(g) if rule == "sign" else g)
            decay = config.optim.weight_decay * p if p.ndim >= 2 else 0.0
            expected.append(-schedule(step) * (direction + decay))
        params = jax.tree.unflatten(jax.tree.structure(params), [p + u for p, u in zip(jax.tree.leaves(params),
                                                                                        ours[step])])
        for got, want in zip(ours[step], expected):
            np.testing.assert_allclose(got, np.asarray(want), rtol=1e-6, atol=1e-12)


def test_frugal_svd_splits_the_gradient_into_the_subspace_and_its_complement():
    config = _config("optim.name=frugal", "optim.frugal.projection=svd", "optim.frugal.density=0.25",
                     "optim.frugal.state_free=sgd", "optim.weight_decay=0")
    params = _params()
    (update,) = _updates(config, 1, params)
    leaves, _ = parameter_leaves(params)
    grads = jax.tree.leaves(_gradients(params, 0))
    lr = float(learning_rate_schedule(config.optim, 100)(0))
    for (path, v), g, u in zip(leaves, grads, update):
        view = matrix_view(v)
        if view is None:
            continue
        sub = Subspace(view, int(np.ceil(0.25 * min(view.m, view.n))))
        p = sub.fit(g)
        residual = np.asarray(g - sub.up(p, sub.down(p, g)))
        # first step: Adam's direction is r / (|r| + eps) for the low-rank gradient r, in the subspace
        low = sub.down(p, g)
        expected = -lr * (np.asarray(sub.up(p, low / (jnp.abs(low) + config.optim.eps))) + residual)
        np.testing.assert_allclose(u, expected, rtol=1e-4, atol=lr * 1e-5, err_msg=path)


def test_state_bytes_per_parameter():
    config = load_config("quickstart.yaml", [])
    per_param = {}
    for name in ("adamw", "adamw8bit", "galore", "frugal"):
        optim = load_config("quickstart.yaml", [f"optim.name={name}"]).optim
        _, abstract = abstract_state(config.model, make_optimizer(optim, 10))
        per_param[name] = state_bytes(abstract.opt_state) / sum(x.size for x in jax.tree.leaves(abstract.params))
    assert per_param["adamw"] == pytest.approx(8.0, abs=1e-4)
    assert per_param["adamw8bit"] <= 2.1
    assert per_param["galore"] < 3.0 and per_param["frugal"] < 3.0, per_param


def test_a_rank_above_a_matrix_side_is_a_config_error():
    config = _config("optim.name=galore", "optim.galore.rank=100")
    with pytest.raises(ConfigError, match=r"^optim.galore.rank=100 is larger than blocks/0/ffn/w_down's smaller "
                                          r"side 64 \(a 192 x 64 matrix\)"):
        abstract_state(config.model, make_optimizer(config.optim, 10))


@pytest.mark.parametrize("override,message", [
    ("optim.adamw8bit.block_size=1000", r"optim.adamw8bit.block_size=1000 must be a power of two"),
    ("optim.galore.rank_fraction=0", r"optim.galore.rank_fraction=0.0 must be in \(0, 1\]"),
    ("optim.frugal.density=2", r"optim.frugal.density=2.0 must be in \[0, 1\]"),
    ("optim.name=adam", r"optim.name"),
])
def test_bad_knobs_are_one_line_config_errors(override, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_config("quickstart.yaml", [override])
    assert "\n" not in str(error.value)


def test_stable_embedding_normalizes_the_embedding_and_keeps_its_moments_in_32_bits():
    config = _config("optim.name=adamw8bit", "optim.adamw8bit.stable_embedding=true", "optim.adamw8bit.min_size=0")
    assert config.model.embedding_norm
    model = create_model(config.model, 0)
    assert hasattr(model, "embed_norm")
    state = make_optimizer(config.optim, 10).init(nnx.state(model, nnx.Param))[1]
    assert set(state.per_param["embed"]["embedding"]) == {"mu", "nu"}
    assert "mu_codes" in state.per_param["blocks"][0]["ffn"]["w_up"]
    with pytest.raises(ConfigError, match="needs model.embedding_norm=true"):
        _config("optim.name=adamw8bit", "optim.adamw8bit.stable_embedding=true", "model.embedding_norm=false")


@pytest.mark.parametrize("name", ["adamw8bit", "galore", "natural_galore", "frugal"])
def test_every_state_array_is_its_own_buffer(name):
    """A train step donates its state, and XLA refuses to donate one buffer twice: an eager init
    (train_step.py's benchmark) must not share an array between two state entries."""
    state = make_optimizer(_config(f"optim.name={name}").optim, 10).init(_params())
    pointers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(state) if x.size]
    assert len(pointers) == len(set(pointers))


@pytest.mark.parametrize("name", ["adamw8bit", "galore", "natural_galore", "frugal"])
def test_state_arrays_shard_over_fsdp_like_their_parameters(name):
    """On an fsdp=4 mesh every large state array is split 4 ways (the device bytes themselves are
    measured on 8 fake devices in tests/train/test_optimizer_state.py): uint8 codes exactly as their
    parameter, projectors and low-rank moments by their kept side or, lacking an embed axis, by the
    rank."""
    from jax.sharding import AbstractMesh, AxisType

    from hybrax.layers.sharding import MESH_AXES, spec
    mesh = AbstractMesh((1, 4, 1, 1, 1), MESH_AXES, axis_types=(AxisType.Auto,) * 5)
    config = load_config("quickstart.yaml", [f"optim.name={name}"])
    _, abstract = abstract_state(config.model, make_optimizer(config.optim, 10))
    params = dict(parameter_leaves(abstract.params)[0])
    for path, variable in parameter_leaves(abstract.opt_state)[0]:
        if not isinstance(variable, nnx.Variable):
            continue   # the step count
        shape, names = variable.get_value().shape, variable.get_metadata()["out_sharding"]
        split = "fsdp" in jax.tree.leaves(tuple(spec(names, shape, mesh)))
        assert split or np.prod(shape) < 4096 or path.endswith("columns"), (path, shape, names)
        if path.endswith("_codes"):
            owner = params[path.split("per_param/", 1)[1].rsplit("/", 1)[0]]
            assert names == owner.get_metadata()["out_sharding"] and shape == owner.get_value().shape
