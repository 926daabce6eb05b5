"""Settings declared once: every key --list-keys shows is settable from the command line, a layer's
key reaches the built layer, unset keys follow the model, and --print-config shows what is built."""

import subprocess
import sys

import pytest
import yaml
from flax import nnx

from hybrax.arch import CausalLM
from hybrax.train.config import ConfigError, load_config
from hybrax.train.settings import list_keys, resolved_tree

# a value other than the default for one key of each mixer family and of each FFN
ONE_KEY_PER_FAMILY = {
    "attention": ("rope_theta", 500.0),                 # softmax
    "moba": ("top_k", 1),                               # sparse
    "nsa": ("window", 16),
    "bilevel_routing_attention": ("lce_width", 2),
    "routing_attention": ("num_clusters", 3),
    "gla": ("key_dim", 24),                             # linear
    "linear_attention": ("chunk_size", 16),
    "mamba2": ("state_dim", 16),
    "swiglu": ("hidden", 96),                           # FFNs
    "moe": ("top_k", 1),
}
SMALL = ["model.d_model=64", "model.num_heads=2"]


def test_every_listed_key_is_settable_from_the_command_line():
    rows = list_keys()
    assert len({r.key for r in rows}) == len(rows) > 150
    shape = load_config("quickstart.yaml").model.shape()
    for row in rows:
        value = row.value
        if row.default.startswith("= model.kernels."):
            value = "auto" if row.key.startswith("model.kernels.") else None
        elif row.default.startswith("= model."):      # inherited: set it to the model's own value
            value = getattr(shape, row.key.rsplit(".", 1)[1])
        value = list(value) if isinstance(value, tuple) else value
        text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        config = load_config("quickstart.yaml", [f"{row.key}={text}"])
        assert _normal(_get(config, row.key)) == _normal(value), row.key


def _get(config, key: str):
    section, *path, leaf = key.split(".")
    node = getattr(config, section)
    for part in path:
        node = node.layer_settings(part) if part in (node.model_extra or {}) else getattr(node, part)
    return getattr(node, leaf)


def _normal(value):
    return list(value) if isinstance(value, (tuple, list)) else value


def test_inherited_keys_are_settable_per_layer():
    config = load_config("quickstart.yaml", ["model.mixers=[gla, attention]", "model.num_layers=2",
                                             "model.gla.num_heads=8", "model.attention.dtype=float32"])
    gla, attention = (config.model.layer_config(name) for name in ("gla", "attention"))
    assert gla.num_heads == 8 and gla.key_dim == 32                # key_dim still follows the model's head_dim
    assert attention.dtype == "float32" and config.model.dtype == "bfloat16"


@pytest.mark.parametrize("name", ONE_KEY_PER_FAMILY)
def test_a_layer_key_reaches_the_built_layer(name):
    key, value = ONE_KEY_PER_FAMILY[name]
    slot = "ffns" if name in ("swiglu", "moe") else "mixers"
    config = load_config("quickstart.yaml", [*SMALL, "model.num_layers=1", f"model.{slot}=[{name}]",
                                             f"model.{name}.{key}={value}"])
    model = CausalLM(config.model, rngs=nnx.Rngs(0))
    layer = getattr(model.blocks[0], "ffn" if slot == "ffns" else "mixer")
    assert getattr(layer.config, key) == value
    default = getattr(load_config("quickstart.yaml", [*SMALL]).model.layer_config(name), key)
    assert default != value          # the key changed something


def test_unset_keys_follow_the_model_and_derived_defaults():
    config = load_config("quickstart.yaml", ["model.d_model=128", "model.num_heads=2", "model.kernels.linear_attention=xla"])
    gla, mamba2, moe = (config.model.layer_config(name) for name in ("gla", "mamba2", "moe"))
    assert (gla.d_model, gla.num_heads, gla.key_dim, gla.value_dim) == (128, 2, 32, 64)
    assert gla.implementation == "xla" and gla.dtype == "bfloat16"
    assert (mamba2.head_dim, mamba2.num_heads) == (64, 4)          # expand 2: 256 / 64
    assert moe.expert_hidden == 384 // 2                             # mlp_hidden 384 / top_k 2


@pytest.mark.parametrize("override,message", [
    ("model.gla.key_dimm=3", "unknown config key 'model.gla.key_dimm' (did you mean 'model.gla.key_dim'?)"),
    ("model.mamba=3", "unknown config key 'model.mamba' (did you mean 'model.mamba2'?)"),
    ("model.gla.chunk_size=x", "config key 'model.gla.chunk_size': Input should be a valid integer"),
    ("model.moe.top_k=9", "model.moe: top_k=9 must be in [1, num_experts=8]"),
    ("model.gla.d_model=64", "model.gla: d_model=64 differs from the model's residual width 256"),
])
def test_bad_layer_keys_fail_with_one_line(override, message):
    extra = ["model.ffns=[moe]"] if "moe" in override else ["model.mixers=[gla]"]
    with pytest.raises(ConfigError) as error:
        load_config("quickstart.yaml", [override, *extra])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_saved_config_reloads_to_the_same_layers():
    config = load_config("quickstart.yaml", ["model.mixers=[gla, nsa]", "model.gla.chunk_size=32"])
    reloaded = type(config).model_validate(yaml.safe_load(config.to_yaml()))
    assert reloaded.model.layer_configs() == config.model.layer_configs()
    assert yaml.safe_load(config.to_yaml())["model"]["gla"] == {"chunk_size": 32}   # only what was set


def test_print_config_and_list_keys_cli():
    printed = subprocess.run([sys.executable, "-m", "hybrax.train", "--config", "hybrid_gla.yaml", "--print-config",
                              "model.gla.chunk_size=32"], capture_output=True, text=True, check=True).stdout
    tree = yaml.safe_load(printed)
    expected = resolved_tree(load_config("hybrid_gla.yaml", ["model.gla.chunk_size=32"]))
    assert tree == expected and tree["model"]["gla"]["chunk_size"] == 32 and tree["model"]["gla"]["key_dim"] == 32
    listed = subprocess.run([sys.executable, "-m", "hybrax.train", "--list-keys"], capture_output=True, text=True,
                            check=True).stdout.splitlines()
    assert len(listed) == len(list_keys())
    assert any(line.startswith("model.mamba2.state_dim ") and "= 128" in line for line in listed)
