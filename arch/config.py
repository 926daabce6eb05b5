"""Model configuration: the per-layer pattern and the shapes, with analytic parameter and FLOP
counts (tests hold them against the built model and XLA's cost analysis)."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

DType = Literal["float32", "bfloat16"]


class StrictConfig(BaseModel):
    """Unknown keys and wrong types are errors; configs are immutable once built."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class SparseAttentionConfig(StrictConfig):
    """Knobs shared by the sparse and routed attention mixers (moba, nsa, bilevel_routing_attention,
    routing_attention): which key blocks each query block reads through `block_sparse_attention`."""

    block_size: int = 16                # tokens per query block and per key block
    top_k: int = 2                      # past blocks selected per query block; the current block is always added
    # training-free sparse prefill of the softmax `attention` mixer (layers/sparse/prefill): the selector
    # lists blocks of block_size on the no-cache path; prefill_options are its budget knobs, e.g.
    # {threshold: 0.95}. Decoding with a KV cache stays dense.
    prefill_selector: Literal["xattention", "minference", "flexprefill"] | None = None
    prefill_options: dict[str, float | int | None] = {}
    window: int = 32                    # nsa: sliding-window tokens before the current block (multiple of block_size)
    compress_block: int | None = None   # nsa: tokens per compressed token (divides block_size; None: block_size)
    lce_width: int = 3                  # bilevel_routing_attention: causal depthwise conv over v (0: none)
    # routing_attention (Routing Transformer): online k-means over queries and keys
    num_clusters: int = 4               # centroids per routing head
    local_heads: int | None = None      # heads attending to blocks n-1 and n instead of routing (None: half)
    kmeans_decay: float = 0.999         # EMA decay of the centroids (training mode only)
    commitment_weight: float = 1e-4     # weight of the auxiliary k-means commitment loss (0: off)


class MoEOptions(StrictConfig):
    """Knobs of the `moe` FFN (layers/moe): routing, dispatch and balancing."""

    num_experts: int = 8
    top_k: int = 2
    expert_hidden: int | None = None    # width of each expert (None: mlp_hidden / (top_k + shared), a multiple of 8)
    num_shared_experts: int = 0         # always-on experts added to the routed output
    score: Literal["softmax", "sigmoid"] = "softmax"
    renormalize: bool = True            # divide the top_k weights by their sum
    dispatch: Literal["dropless", "capacity"] = "dropless"
    capacity_factor: float = 1.25       # capacity mode: C = ceil(T * top_k / num_experts * capacity_factor)
    balance_loss_weight: float = 0.01   # switch loss E sum_i f_i p_i (0: off)
    balance_scope: Literal["sequence", "micro", "global"] = "micro"
    z_loss_weight: float = 0.0          # router z-loss (1e-3 in ST-MoE; 0: off)
    bias_update_rate: float = 0.0       # auxiliary-loss-free balancing (1e-3 in Wang et al. 2024; 0: off)
    # expert parallelism (mesh axis `expert`): a padded all_to_all (runs anywhere; the tested one) or
    # ragged_all_to_all (GPU/TPU only; compiled for TPU in the tests, not yet run on hardware)
    exchange: Literal["padded", "ragged"] = "padded"


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
    from hybrax.pallas_kernels.dot_product_attention.api import IMPLEMENTATIONS as dense
    from hybrax.pallas_kernels.grouped_matmul.api import IMPLEMENTATIONS as grouped
    from hybrax.pallas_kernels.linear_attention.api import IMPLEMENTATIONS as linear
    return {"attention": dense, "linear_attention": linear, "block_sparse_attention": block_sparse,
            "grouped_matmul": grouped}


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
    sparse: SparseAttentionConfig = SparseAttentionConfig()
    moe: MoEOptions = MoEOptions()
    kernels: KernelsConfig = KernelsConfig()

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
        from hybrax.arch.registry import FFNS, MIXERS  # the registry imports this module
        for key, registry in (("mixers", MIXERS), ("ffns", FFNS)):
            for name in getattr(self, key):
                if name not in registry.names():
                    raise ValueError(f"model.{key}: unknown {registry.kind} {name!r}; registered: {registry.names()}")
            for name in set(getattr(self, key)):  # each layer's own checks, before any compute
                try:
                    registry.config_for(name, self)
                except ValueError as e:
                    raise ValueError(f"model.{key}: {registry.kind} {name!r}: {e} (see model.sparse, model.moe "
                                     "and the shapes)")
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

    def layer_configs(self) -> list[tuple[object, object]]:
        from hybrax.arch.registry import FFNS, MIXERS  # the registry imports this module
        return [(MIXERS.config_for(m, self), FFNS.config_for(f, self)) for m, f in self.layer_pattern()]

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
