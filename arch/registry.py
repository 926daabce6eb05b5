"""Name -> layer registries. Later mixers and FFNs register here; the model never changes.

An entry is a config builder (ModelConfig -> the layer's frozen config, which knows its
`num_params()` and `flops_per_token(seq_len)`) and the module class built from that config.
"""

import dataclasses
from collections.abc import Callable

from hybrax.arch.config import ModelConfig
from hybrax.layers.softmax.attention import Attention, AttentionConfig
from hybrax.layers.sparse.bilevel_routing_attention import BilevelRoutingAttention, BilevelRoutingConfig
from hybrax.layers.linear.gla import GLA, GLAConfig
from hybrax.layers.linear.linear_attention import LinearAttention, LinearAttentionConfig
from hybrax.layers.linear.mamba2 import Mamba2, Mamba2Config
from hybrax.layers.mlp import MLPConfig, SwiGLU
from hybrax.layers.sparse.moba import MoBA, MoBAConfig
from hybrax.layers.moe import MoE, MoEConfig
from hybrax.layers.sparse.nsa import NSA, NSAConfig
from hybrax.layers.sparse.routing_attention import RoutingAttention, RoutingAttentionConfig


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
                           implementation=m.kernels.implementation("attention"), dtype=m.dtype, param_dtype=m.param_dtype,
                           sparse_prefill=m.sparse.prefill_selector, sparse_block_size=m.sparse.block_size,
                           sparse_options=tuple(sorted(m.sparse.prefill_options.items())),
                           sparse_implementation=m.kernels.implementation("block_sparse_attention"))


def _linear_attention_config(m: ModelConfig) -> LinearAttentionConfig:
    """Lightning attention with the attention heads' shape: H = num_heads, K = V = head_size."""
    return LinearAttentionConfig(d_model=m.d_model, num_heads=m.num_heads, head_dim=m.head_size, init_std=m.init_std,
                                 implementation=m.kernels.implementation("linear_attention"), dtype=m.dtype,
                                 param_dtype=m.param_dtype)


def _gla_config(m: ModelConfig) -> GLAConfig:
    """GLA's expand_k = 1/2, expand_v = 1: H = num_heads, K = head_size / 2, V = head_size."""
    return GLAConfig(d_model=m.d_model, num_heads=m.num_heads, key_dim=m.head_size // 2, value_dim=m.head_size,
                     init_std=m.init_std, implementation=m.kernels.implementation("linear_attention"), dtype=m.dtype,
                     param_dtype=m.param_dtype)


def _mamba2_config(m: ModelConfig) -> Mamba2Config:
    """Mamba-2's expand = 2 as twice the heads of width head_size (d_model 256, 4 heads: 8 heads of
    64, the reference head_dim); state size N = 128."""
    return Mamba2Config(d_model=m.d_model, num_heads=2 * m.num_heads, head_dim=m.head_size, init_std=m.init_std,
                        implementation=m.kernels.implementation("linear_attention"), dtype=m.dtype,
                        param_dtype=m.param_dtype)


def _routing_attention_config(m: ModelConfig) -> RoutingAttentionConfig:
    s = m.sparse
    return RoutingAttentionConfig(d_model=m.d_model, num_heads=m.num_heads, num_kv_heads=m.kv_heads,
                                  head_dim=m.head_size, block_size=s.block_size, top_k=s.top_k,
                                  num_clusters=s.num_clusters, local_heads=s.local_heads,
                                  kmeans_decay=s.kmeans_decay, commitment_weight=s.commitment_weight,
                                  rope_theta=m.rope_theta, init_std=m.init_std, implementation=m.kernels.implementation("block_sparse_attention"),
                                  dtype=m.dtype, param_dtype=m.param_dtype)


def _block_sparse_shapes(m: ModelConfig) -> dict:
    """The attention shapes and m.sparse's block selection, shared by moba, nsa and bilevel routing."""
    return dict(d_model=m.d_model, num_heads=m.num_heads, num_kv_heads=m.kv_heads, head_dim=m.head_size,
                block_size=m.sparse.block_size, top_k=m.sparse.top_k, rope_theta=m.rope_theta,
                init_std=m.init_std, implementation=m.kernels.implementation("block_sparse_attention"), dtype=m.dtype,
                param_dtype=m.param_dtype)


def _moba_config(m: ModelConfig) -> MoBAConfig:
    return MoBAConfig(**_block_sparse_shapes(m))


def _nsa_config(m: ModelConfig) -> NSAConfig:
    """NSA's compressed tokens default to one per selection block (compress_block = block_size)."""
    return NSAConfig(**_block_sparse_shapes(m), window=m.sparse.window,
                     compress_block=m.sparse.compress_block or m.sparse.block_size)


def _bilevel_routing_config(m: ModelConfig) -> BilevelRoutingConfig:
    return BilevelRoutingConfig(**_block_sparse_shapes(m), lce_width=m.sparse.lce_width)


def _swiglu_config(m: ModelConfig) -> MLPConfig:
    return MLPConfig(d_model=m.d_model, hidden=m.mlp_size, init_std=m.init_std, dtype=m.dtype,
                     param_dtype=m.param_dtype)


def _moe_config(m: ModelConfig) -> MoEConfig:
    """Experts default to the dense FFN's active width: mlp_hidden / (top_k + shared), a multiple of 8."""
    o = m.moe
    hidden = o.expert_hidden or max(8, m.mlp_size // (o.top_k + o.num_shared_experts) // 8 * 8)
    return MoEConfig(d_model=m.d_model, num_experts=o.num_experts, top_k=o.top_k, expert_hidden=hidden,
                     num_shared_experts=o.num_shared_experts, score=o.score, renormalize=o.renormalize,
                     dispatch=o.dispatch, capacity_factor=o.capacity_factor,
                     balance_loss_weight=o.balance_loss_weight, balance_scope=o.balance_scope,
                     z_loss_weight=o.z_loss_weight, bias_update_rate=o.bias_update_rate,
                     exchange=o.exchange, implementation=m.kernels.implementation("grouped_matmul"), init_std=m.init_std, dtype=m.dtype, param_dtype=m.param_dtype)


MIXERS.register("attention", _attention_config, Attention)
MIXERS.register("linear_attention", _linear_attention_config, LinearAttention)
MIXERS.register("gla", _gla_config, GLA)
MIXERS.register("mamba2", _mamba2_config, Mamba2)
MIXERS.register("moba", _moba_config, MoBA)
MIXERS.register("nsa", _nsa_config, NSA)
MIXERS.register("bilevel_routing_attention", _bilevel_routing_config, BilevelRoutingAttention)
MIXERS.register("routing_attention", _routing_attention_config, RoutingAttention)
FFNS.register("swiglu", _swiglu_config, SwiGLU)
FFNS.register("moe", _moe_config, MoE)
