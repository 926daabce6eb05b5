"""Name -> (config class, module class) for every mixer and FFN; the model never changes.

    MIXERS.register("gla", GLAConfig, GLA)

A layer's config class (a `layers.config.LayerConfig`) declares its settings once: YAML reaches
them as `model.<name>.<key>`, the config knows its `num_params()` and `flops_per_token(seq_len)`,
and the module is built from it. Mixer and FFN names share the `model.<name>` namespace.
"""

import dataclasses

from hybrax.layers.config import LayerConfig
from hybrax.layers.linear.gated_deltanet import GatedDeltaNet, GatedDeltaNetConfig
from hybrax.layers.linear.gla import GLA, GLAConfig
from hybrax.layers.linear.linear_attention import LinearAttention, LinearAttentionConfig
from hybrax.layers.linear.mamba2 import Mamba2, Mamba2Config
from hybrax.layers.linear.mlstm import MLSTM, MLSTMConfig
from hybrax.layers.linear.slstm import SLSTM, SLSTMConfig
from hybrax.layers.mlp import MLPConfig, SwiGLU
from hybrax.layers.moe import MoE, MoEConfig
from hybrax.layers.moe.moma import MoMa
from hybrax.layers.moe.moma_config import MoMaConfig
from hybrax.layers.moe.selective_attention import SelectiveAttention, SelectiveAttentionConfig
from hybrax.layers.moe.union_mlp import UnionMLP, UnionMLPConfig
from hybrax.layers.softmax.attention import Attention, AttentionConfig
from hybrax.layers.softmax.cca import CCA, CCAConfig
from hybrax.layers.softmax.mla import MLA, MLAConfig
from hybrax.layers.sparse.bilevel_routing_attention import BilevelRoutingAttention, BilevelRoutingConfig
from hybrax.layers.sparse.moba import MoBA, MoBAConfig
from hybrax.layers.sparse.nsa import NSA, NSAConfig
from hybrax.layers.sparse.routing_attention import RoutingAttention, RoutingAttentionConfig


@dataclasses.dataclass(frozen=True)
class Entry:
    config: type[LayerConfig]
    module: type


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self.entries: dict[str, Entry] = {}

    def register(self, name: str, config: type[LayerConfig], module: type) -> None:
        if name in self.entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        if any(name in registry.entries for registry in REGISTRIES):
            raise ValueError(f"{name!r} is already registered as another kind of layer; names share model.<name>")
        self.entries[name] = Entry(config, module)

    def unregister(self, name: str) -> None:
        del self.entries[name]

    def get(self, name: str) -> Entry:
        if name not in self.entries:
            raise ValueError(f"unknown {self.kind} {name!r}; registered: {sorted(self.entries)}")
        return self.entries[name]

    def config_for(self, name: str, model) -> LayerConfig:
        """The layer's config in `model` (a ModelConfig): its model.<name> settings, bound."""
        self.get(name)
        return model.layer_config(name)

    def build(self, name: str, model, *, rngs):
        return self.get(name).module(self.config_for(name, model), rngs=rngs)

    def names(self) -> list[str]:
        return sorted(self.entries)


MIXERS = Registry("mixer")
FFNS = Registry("ffn")
REGISTRIES = (MIXERS, FFNS)


def layer_entry(name: str) -> Entry | None:
    """The entry registered under `name` in either registry."""
    return next((registry.entries[name] for registry in REGISTRIES if name in registry.entries), None)


def layer_names() -> list[str]:
    return [name for registry in REGISTRIES for name in registry.names()]


MIXERS.register("attention", AttentionConfig, Attention)
MIXERS.register("linear_attention", LinearAttentionConfig, LinearAttention)
MIXERS.register("gla", GLAConfig, GLA)
MIXERS.register("mamba2", Mamba2Config, Mamba2)
MIXERS.register("mlstm", MLSTMConfig, MLSTM)
MIXERS.register("slstm", SLSTMConfig, SLSTM)
MIXERS.register("gated_deltanet", GatedDeltaNetConfig, GatedDeltaNet)
MIXERS.register("moba", MoBAConfig, MoBA)
MIXERS.register("nsa", NSAConfig, NSA)
MIXERS.register("bilevel_routing_attention", BilevelRoutingConfig, BilevelRoutingAttention)
MIXERS.register("routing_attention", RoutingAttentionConfig, RoutingAttention)
MIXERS.register("uoe_attention", SelectiveAttentionConfig, SelectiveAttention)
MIXERS.register("cca", CCAConfig, CCA)
MIXERS.register("mla", MLAConfig, MLA)
FFNS.register("swiglu", MLPConfig, SwiGLU)
FFNS.register("moe", MoEConfig, MoE)
FFNS.register("uoe_mlp", UnionMLPConfig, UnionMLP)
FFNS.register("moma", MoMaConfig, MoMa)
