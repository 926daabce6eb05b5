"""Name -> layer registries. Later mixers and FFNs register here; the model never changes.

An entry is a config builder (ModelConfig -> the layer's frozen config, which knows its
`num_params()` and `flops_per_token(seq_len)`) and the module class built from that config.
"""

import dataclasses
from collections.abc import Callable

from arch.config import ModelConfig
from layers.attention import Attention, AttentionConfig
from layers.mlp import MLPConfig, SwiGLU


@dataclasses.dataclass(frozen=True)
class Entry:
    make_config: Callable[[ModelConfig], object]
    module: type


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self.entries: dict[str, Entry] = {}

    def register(self, name: str, make_config: Callable[[ModelConfig], object], module: type) -> None:
        if name in self.entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self.entries[name] = Entry(make_config, module)

    def get(self, name: str) -> Entry:
        if name not in self.entries:
            raise ValueError(f"unknown {self.kind} {name!r}; registered: {sorted(self.entries)}")
        return self.entries[name]

    def config_for(self, name: str, model: ModelConfig):
        return self.get(name).make_config(model)

    def build(self, name: str, model: ModelConfig, *, rngs):
        entry = self.get(name)
        return entry.module(entry.make_config(model), rngs=rngs)

    def names(self) -> list[str]:
        return sorted(self.entries)


MIXERS = Registry("mixer")
FFNS = Registry("ffn")


def _attention_config(m: ModelConfig) -> AttentionConfig:
    return AttentionConfig(d_model=m.d_model, num_heads=m.num_heads, num_kv_heads=m.kv_heads,
                           head_dim=m.head_size, rope_theta=m.rope_theta, init_std=m.init_std,
                           implementation=m.attention_implementation, dtype=m.dtype, param_dtype=m.param_dtype)


def _swiglu_config(m: ModelConfig) -> MLPConfig:
    return MLPConfig(d_model=m.d_model, hidden=m.mlp_size, init_std=m.init_std, dtype=m.dtype,
                     param_dtype=m.param_dtype)


MIXERS.register("attention", _attention_config, Attention)
FFNS.register("swiglu", _swiglu_config, SwiGLU)
