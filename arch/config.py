"""Model configuration: the per-layer pattern, the model-wide shapes and each layer's own settings,
with analytic parameter and FLOP counts (tests hold them against the built model and XLA's cost
analysis).

    model:
      d_model: 256
      mixers: [gla, gla, gla, attention]
      gla: {key_dim: 64, chunk_size: 32}     # model.<registered layer>.<key>: that layer's config
      kernels: {linear_attention: auto}

A layer's section holds only what differs from its config class's defaults; the rest follows the
model (layers/config.py: `LayerConfig.bind`)."""

import difflib

import pydantic
from pydantic import ConfigDict, model_validator

from hybrax.arch.registry import FFNS, MIXERS, layer_entry, layer_names
from hybrax.layers.config import DType, LayerConfig, ModelShape, StrictConfig

KernelChoice = str | list[str]


class KernelsConfig(StrictConfig):
    """Which implementation runs each op (pallas_kernels): "auto" (the op's default order, keeping
    only implementations verified on the running backend: pallas_kernels/verified.py), a name, or a
    list of names tried in order. The run log says once per op which one ran and why the others
    were refused; `strict` makes a refusal an error at trace time, before anything compiles."""

    attention: KernelChoice = "auto"               # dot_product_attention: xla, cudnn, splash, pallas_gpu, ...
    linear_attention: KernelChoice = "auto"        # xla, pallas_tpu, pallas_gpu, pallas, reference
    block_sparse_attention: KernelChoice = "auto"  # xla, pallas_tpu, pallas_gpu, pallas, reference
    grouped_matmul: KernelChoice = "auto"          # xla, ragged_dot, pallas_tpu, reference
    delta_rule: KernelChoice = "auto"              # xla, pallas_tpu, pallas_gpu, pallas, reference
    mlstm: KernelChoice = "auto"                   # xla, pallas_tpu, pallas_gpu, pallas, reference
    slstm: KernelChoice = "auto"                   # xla, pallas_tpu, pallas_gpu, pallas, reference
    strict: bool = False

    @model_validator(mode="after")
    def _check_names(self):
        for key, implementations in kernel_implementations().items():
            value = getattr(self, key)
            names = [value] if isinstance(value, str) else value
            if not names:
                raise ValueError(f"model.kernels.{key}=[] names nothing; use 'auto' or names from "
                                 f"{sorted(implementations)}")
            for name in names:
                if name not in implementations and not (name == "auto" and isinstance(value, str)):
                    raise ValueError(f"model.kernels.{key}: unknown implementation {name!r}; valid: 'auto' or "
                                     f"{sorted(implementations)}")
        return self

    def implementation(self, key: str) -> str | tuple[str, ...] | None:
        """What a layer passes to the op: None for auto, a name, or a tuple of names."""
        value = getattr(self, key)
        if isinstance(value, str):
            return None if value == "auto" else value
        return tuple(value)


def kernel_implementations() -> dict:
    """model.kernels key -> the op's implementation table."""
    from hybrax.pallas_kernels.block_sparse_attention.api import IMPLEMENTATIONS as block_sparse
    from hybrax.pallas_kernels.delta_rule.api import IMPLEMENTATIONS as delta_rule
    from hybrax.pallas_kernels.dot_product_attention.api import IMPLEMENTATIONS as dense
    from hybrax.pallas_kernels.grouped_matmul.api import IMPLEMENTATIONS as grouped
    from hybrax.pallas_kernels.linear_attention.api import IMPLEMENTATIONS as linear
    from hybrax.pallas_kernels.mlstm.api import IMPLEMENTATIONS as mlstm
    from hybrax.pallas_kernels.slstm.api import IMPLEMENTATIONS as slstm
    return {"attention": dense, "linear_attention": linear, "block_sparse_attention": block_sparse,
            "grouped_matmul": grouped, "delta_rule": delta_rule, "mlstm": mlstm, "slstm": slstm}


class ModelConfig(StrictConfig):
    vocab_size: int = 259
    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None     # None: same as num_heads (multi-head attention)
    head_dim: int | None = None         # None: d_model // num_heads
    mlp_hidden: int | None = None       # None: 8/3 d_model rounded up to a multiple of 64
    mixers: list[str] = ["attention"]   # repeated cyclically over the layers
    ffns: list[str] = ["swiglu"]
    tie_embeddings: bool = True
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    dtype: DType = "float32"
    param_dtype: DType = "float32"
    remat: bool = False                 # recompute each block's activations in the backward pass
    kernels: KernelsConfig = KernelsConfig()
    # model.<layer name>: a registered mixer's or FFN's settings (its LayerConfig), kept as extras
    model_config = ConfigDict(extra="allow", frozen=True, validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _layer_sections(cls, data):
        """Each key that is not a field must name a registered layer; its section is validated by
        that layer's config class, one line per problem."""
        if not isinstance(data, dict):
            return data
        sections = {}
        for name, section in data.items():
            if name in cls.model_fields:
                continue
            entry = layer_entry(name)
            if entry is None:
                raise ValueError(_unknown(f"model.{name}", [f"model.{key}" for key in (*cls.model_fields, *layer_names())]))
            sections[name] = _layer_section(name, entry.config, section)
        return {**data, **sections}

    @model_validator(mode="after")
    def _check_shapes(self):
        for key in ("vocab_size", "d_model", "num_layers", "num_heads"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key}={getattr(self, key)} must be >= 1")
        if self.d_model % self.num_heads and self.head_dim is None:
            raise ValueError(f"model.num_heads={self.num_heads} does not divide model.d_model={self.d_model}")
        if self.num_heads % self.kv_heads:
            raise ValueError(f"model.num_kv_heads={self.kv_heads} does not divide model.num_heads={self.num_heads}")
        if self.head_size % 2:
            raise ValueError(f"model.head_dim={self.head_size} must be even for rotary embeddings")
        if not self.mixers or not self.ffns:
            raise ValueError("model.mixers and model.ffns need at least one name each")
        for key in ("mixers", "ffns"):
            count = len(getattr(self, key))
            if self.num_layers % count:
                raise ValueError(f"model.{key} has {count} names for model.num_layers={self.num_layers}; give "
                                 f"num_layers names or a pattern whose length divides it (repeated over the layers)")
        for key, registry in (("mixers", MIXERS), ("ffns", FFNS)):
            for name in getattr(self, key):
                if name not in registry.names():
                    raise ValueError(f"model.{key}: unknown {registry.kind} {name!r}; registered: {registry.names()}")
            for name in set(getattr(self, key)):  # each layer's own checks, before any compute
                try:
                    self.layer_config(name)
                except (ValueError, pydantic.ValidationError) as e:
                    raise ValueError(f"model.{name}: {_first_error(e)} (with the model's shapes: d_model={self.d_model}, "
                                     f"num_heads={self.num_heads}, num_kv_heads={self.kv_heads}, "
                                     f"head_dim={self.head_size})") from None
        return self

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def mlp_size(self) -> int:
        return self.mlp_hidden or -(-8 * self.d_model // 3 // 64) * 64

    def layer_pattern(self) -> list[tuple[str, str]]:
        """(mixer name, ffn name) for each layer."""
        return [(self.mixers[i % len(self.mixers)], self.ffns[i % len(self.ffns)]) for i in range(self.num_layers)]

    def shape(self) -> ModelShape:
        """The model-wide settings every layer inherits."""
        return ModelShape(d_model=self.d_model, num_heads=self.num_heads, num_kv_heads=self.kv_heads,
                          head_dim=self.head_size, mlp_hidden=self.mlp_size, rope_theta=self.rope_theta,
                          init_std=self.init_std, dtype=self.dtype, param_dtype=self.param_dtype,
                          kernels=tuple((key, self.kernels.implementation(key)) for key in kernel_implementations()))

    def layer_settings(self, name: str) -> LayerConfig:
        """What model.<name> sets (the config class's defaults where absent), unbound."""
        settings = (self.model_extra or {}).get(name)
        return settings if settings is not None else layer_entry(name).config()

    def layer_config(self, name: str) -> LayerConfig:
        """The config layer `name` is built from: its settings bound to this model's shapes."""
        return self.layer_settings(name).bind(self.shape())

    def layer_configs(self) -> list[tuple[object, object]]:
        return [(self.layer_config(m), self.layer_config(f)) for m, f in self.layer_pattern()]

    def num_params(self) -> int:
        return self._embeddings_and_norms() + sum(m.num_params() + f.num_params() for m, f in self.layer_configs())

    def num_active_params(self) -> int:
        """Parameters one token uses (mixture-of-experts layers count their router, top_k and shared
        experts only); equal to num_params() for a dense model."""
        return self._embeddings_and_norms() + sum(_active(m) + _active(f) for m, f in self.layer_configs())

    def _embeddings_and_norms(self) -> int:
        norms = (2 * self.num_layers + 1) * self.d_model
        return norms + self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)

    def flops_per_token(self, seq_len: int) -> int:
        """Forward-pass FLOPs per token (matmuls, 2 per multiply-add). Training is 3x this."""
        layers = sum(m.flops_per_token(seq_len) + f.flops_per_token(seq_len) for m, f in self.layer_configs())
        return layers + 2 * self.d_model * self.vocab_size


def _active(layer_config) -> int:
    """A layer config's active parameters: `num_active_params()` where it routes, else all."""
    count = getattr(layer_config, "num_active_params", None)
    return count() if count is not None else layer_config.num_params()


def _unknown(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"unknown config key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


def _first_error(error: Exception) -> str:
    if not isinstance(error, pydantic.ValidationError):
        return str(error)
    first = error.errors()[0]
    return first["msg"].removeprefix("Value error, ")


def _layer_section(name: str, config: type[LayerConfig], section) -> LayerConfig:
    """model.<name> validated by the layer's config class; a one-line error names the key."""
    if isinstance(section, LayerConfig):
        return section
    if not isinstance(section, dict):
        raise ValueError(f"model.{name} must be a mapping of {name}'s settings, got {section!r}")
    try:
        return config.model_validate(section)
    except pydantic.ValidationError as e:
        first = e.errors()[0]
        key = ".".join(["model", name, *(str(p) for p in first["loc"])])
        if first["type"] == "extra_forbidden":
            raise ValueError(_unknown(key, [f"model.{name}.{k}" for k in config.model_fields])) from None
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "value_error":
            raise ValueError(f"model.{name}: {message}") from None
        raise ValueError(f"config key {key!r}: {message} (got {first.get('input')!r})") from None
