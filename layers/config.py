"""Layer settings, declared once: each layer's config class is the only declaration of its knobs.

    class GLAConfig(LayerConfig):
        kernel: ClassVar[str] = "linear_attention"   # follows model.kernels.linear_attention
        num_heads: int = 4                           # (unset: model.num_heads)
        key_dim: int | None = None                   # per head (None: head_dim / 2)
        def derived(self, shape): return {"key_dim": shape.head_dim // 2}

YAML reaches a registered layer's fields as `model.<name>.<field>` (`model.gla.key_dim=32`). A
layer is built from `config.bind(shape)`: every field the user did not set that shares its name
with a model-wide setting (`ModelShape`: d_model, num_heads, head_dim, dtype, ...) takes the
model's value; `derived(shape)` fills the layer's own defaults that follow from the model (and any
field left None); `implementation`, unset, follows `model.kernels.<kernel>`. A config built
directly with every value (as the tests do) is used as it is.
"""

import dataclasses
from typing import ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, model_serializer

DType = Literal["float32", "bfloat16"]
Implementation = str | tuple[str, ...] | None   # an op's implementation: a name, names in order, or None (auto)


class StrictConfig(BaseModel):
    """Unknown keys and wrong types are errors; configs are immutable once built."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The model-wide settings a layer inherits, resolved (model.head_dim None -> d_model / heads)."""

    d_model: int = 256
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 64
    mlp_hidden: int = 704
    rope_theta: float = 10_000.0
    init_std: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"
    kernels: tuple[tuple[str, Implementation], ...] = ()   # model.kernels key -> implementation (None: auto)

    def implementation(self, kernel: str) -> Implementation:
        return dict(self.kernels).get(kernel)


def itemsize(dtype: str) -> int:
    """Bytes of one number of `dtype` ("float32", "bfloat16", "int32", ...)."""
    import numpy as np
    return 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize


# the conformance suite's model: small enough for token-by-token decoding in a test
TINY_SHAPE = ModelShape(d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_hidden=64)


class LayerConfig(StrictConfig):
    """Base of every registered layer's config (see the module docstring)."""

    kernel: ClassVar[str | None] = None   # the model.kernels key of the op the layer calls
    tiny: ClassVar[dict] = {}             # settings over TINY_SHAPE for the conformance suite

    def derived(self, shape: ModelShape) -> dict:
        """Defaults that follow from the model, for fields the user left unset (or None)."""
        del shape
        return {}

    def kv_cache_bytes_per_token(self) -> float:
        """Bytes the layer's decoding cache grows by per token of a sequence (keys and values, a
        latent); 0 where the cache does not grow with the sequence (a recurrent state). The law
        `init_cache(B, S)` bytes = B (S kv_cache_bytes_per_token + state_bytes_per_sequence) + a few
        counters is checked for every registered layer (tests/layers/test_cache_bytes.py)."""
        return 0

    def state_bytes_per_sequence(self) -> int:
        """Bytes of the layer's decoding cache that do not grow with the sequence, per sequence (a
        recurrent state, convolution tails, routing counts)."""
        return 0

    def bind(self, shape: ModelShape) -> Self:
        """This config completed for a model of `shape`; the layer's own checks run again."""
        if "d_model" in self.model_fields_set and getattr(self, "d_model", shape.d_model) != shape.d_model:
            raise ValueError(f"d_model={self.d_model} differs from the model's residual width {shape.d_model}; "
                             "set model.d_model")
        inherited = {name: getattr(shape, name) for name in type(self).model_fields
                     if name not in self.model_fields_set and hasattr(ModelShape, name)}
        if self.kernel is not None and "implementation" not in self.model_fields_set:
            inherited["implementation"] = shape.implementation(self.kernel)
        derived = {name: value for name, value in self.derived(shape).items()
                   if name not in self.model_fields_set or getattr(self, name) is None}
        values = {**{name: getattr(self, name) for name in type(self).model_fields}, **inherited, **derived}
        return type(self).model_validate(values)

    @model_serializer(mode="wrap")
    def _only_what_was_set(self, handler):
        """A dump holds the user's settings only, so that a reloaded config still inherits."""
        return {key: value for key, value in handler(self).items() if key in self.model_fields_set}
