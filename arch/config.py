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
import math

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


RECURSION_SHARING = ("cycle", "middle_cycle")
RECURSION_ROUTING = ("expert_choice", "token_choice", "none")
RECURSION_KV = ("per_recursion", "shared")


class RecursionConfig(StrictConfig):
    """Mixture-of-Recursions (Bae et al., 2025): a shared stack of layers applied up to
    `num_recursions` times, with a router deciding which tokens take each further step
    (arch/mixture_of_recursions.py).

    `model.num_layers` counts the distinct layers built. `cycle` shares all of them; `middle_cycle`
    keeps the first and the last unique and shares the ones between. `capacity[r]` is the fraction
    of a row's tokens that recursion step r processes (fixed, so every shape is static); a step at
    capacity 1 takes every token still active, without a router.

    `expert_choice`: each step with capacity < 1 keeps the top capacity[r] T of the tokens still
    active by a sigmoid router, which also gates their update. The choice looks at the whole row, so
    training is not causal; a binary cross-entropy on the same router (`router_aux_loss_weight`)
    teaches it to say on its own whether a token would be chosen, and evaluation and decoding choose
    by that (logit > 0): causal. `token_choice`: one softmax router over the depths 1..N_r assigns
    each token its depth before the first recursion; step r takes the tokens assigned a depth > r
    in order of position up to its capacity (later ones overflow and stop): causal everywhere; a
    switch loss balances the depths. `none`: a plain recursive model, every token every step.

    `kv_cache`: `per_recursion` (each step keeps keys and values of the tokens it processes) or
    `shared` (every step attends to the keys and values of the first recursion; capacity[0] must be
    1 and the shared layers attention)."""

    num_recursions: int = 2                 # N_r: steps through the shared stack at most
    sharing: str = "middle_cycle"           # cycle (share every layer) | middle_cycle (first and last unique)
    routing: str = "expert_choice"          # expert_choice | token_choice | none
    # per step; None: (N_r - r) / N_r, e.g. 1, 2/3, 1/3 for three (token_choice: times capacity_factor, at most 1)
    capacity: list[float] | None = None
    capacity_factor: float = 1.25           # token_choice: head room over the balanced share of each depth
    kv_cache: str = "per_recursion"         # per_recursion | shared (later steps read the first step's keys, values)
    router_aux_loss_weight: float = 0.1     # expert_choice: BCE(router logit, chosen), makes inference causal
    balance_loss_weight: float = 0.01       # token_choice: switch loss over the depths

    @model_validator(mode="after")
    def _check(self):
        if self.num_recursions < 1:
            raise ValueError(f"model.recursion.num_recursions={self.num_recursions} must be >= 1")
        for key, valid in (("sharing", RECURSION_SHARING), ("routing", RECURSION_ROUTING), ("kv_cache", RECURSION_KV)):
            if getattr(self, key) not in valid:
                raise ValueError(f"model.recursion.{key}={getattr(self, key)!r} is not one of {valid}")
        if self.capacity is not None:
            if len(self.capacity) != self.num_recursions:
                raise ValueError(f"model.recursion.capacity has {len(self.capacity)} values for "
                                 f"num_recursions={self.num_recursions}; give one per recursion step")
            increasing = any(b > a for a, b in zip(self.capacity, self.capacity[1:]))
            if any(not 0 < c <= 1 for c in self.capacity) or increasing:
                raise ValueError(f"model.recursion.capacity={self.capacity} must lie in (0, 1] and not increase")
        if self.capacity_factor <= 0:
            raise ValueError(f"model.recursion.capacity_factor={self.capacity_factor} must be > 0")
        if self.kv_cache == "shared" and self.capacities()[0] < 1:
            raise ValueError(f"model.recursion.kv_cache=shared needs capacity[0] = 1 (the first recursion's keys "
                             f"and values cover every token); got {self.capacities()[0]}")
        for key in ("router_aux_loss_weight", "balance_loss_weight"):
            if getattr(self, key) < 0:
                raise ValueError(f"model.recursion.{key}={getattr(self, key)} must be >= 0")
        return self

    def capacities(self) -> list[float]:
        """The fraction of a row each step processes."""
        if self.capacity is not None:
            return list(self.capacity)
        n = self.num_recursions
        share = [(n - r) / n for r in range(n)]
        if self.routing == "token_choice":
            return [1.0] + [min(1.0, self.capacity_factor * s) for s in share[1:]]
        return share if self.routing == "expert_choice" else [1.0] * n

    def slots(self, seq_len: int) -> list[int]:
        """Tokens per row each step processes: ceil(capacity[r] T), at least 1."""
        return [max(1, math.ceil(c * seq_len - 1e-9)) for c in self.capacities()]


class DepthRoutingConfig(StrictConfig):
    """Mixture-of-Depths (Raposo et al., 2024), which MoMa (Lin et al., 2024) combines with its
    modality experts: every `every`-th block (blocks every-1, 2 every-1, ... counting from 0) is
    routed (arch/mixture_of_depths.py). Its router logit l = x w keeps the C = ceil(capacity T)
    tokens of each row with the highest l; only they go through the block, as a shorter sequence in
    order of position, and each adds sigmoid(l) (block(x) - x); the others skip the block
    unchanged. Top-C reads the whole row, so training is not causal: a binary cross-entropy on the
    same logit (`router_aux_loss_weight`) teaches l > 0 to predict the choice, and evaluation and
    decoding keep the tokens with l > 0 (causal). At capacity 1 a routed block is the plain block."""

    capacity: float = 0.125                 # share of a row's tokens a routed block processes in training
    every: int = 2                          # route every every-th block
    router_aux_loss_weight: float = 0.01    # BCE(router logit, kept): makes inference causal

    @model_validator(mode="after")
    def _check(self):
        if not 0 < self.capacity <= 1:
            raise ValueError(f"model.depth_routing.capacity={self.capacity} must be in (0, 1]")
        if self.every < 1:
            raise ValueError(f"model.depth_routing.every={self.every} must be >= 1")
        if self.router_aux_loss_weight < 0:
            raise ValueError(f"model.depth_routing.router_aux_loss_weight={self.router_aux_loss_weight} must be >= 0")
        return self

    def slots(self, seq_len: int) -> int:
        """Tokens per row a routed block processes in training: ceil(capacity T), at least 1."""
        return max(1, math.ceil(self.capacity * seq_len - 1e-9))


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
    embedding_norm: bool = False        # an RMSNorm on the embedding's output (optim.adamw8bit.stable_embedding)
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    dtype: DType = "float32"
    param_dtype: DType = "float32"
    remat: bool = False                 # recompute each block's activations in the backward pass
    kernels: KernelsConfig = KernelsConfig()
    recursion: RecursionConfig | None = None   # Mixture-of-Recursions over a shared stack (None: plain depth)
    depth_routing: DepthRoutingConfig | None = None   # Mixture-of-Depths: tokens skip every n-th block (None: none)
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
        if self.recursion is not None:
            self._check_recursion()
        if self.depth_routing is not None:
            if self.recursion is not None:
                raise ValueError("model.depth_routing (Mixture-of-Depths) and model.recursion (Mixture-of-Recursions) "
                                 "both route tokens past blocks; set one of them")
            if self.depth_routing.every > self.num_layers:
                raise ValueError(f"model.depth_routing.every={self.depth_routing.every} routes no block of "
                                 f"model.num_layers={self.num_layers}; use every <= num_layers")
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

    def _check_recursion(self) -> None:
        rc = self.recursion
        if "moma" in self.ffns:
            raise ValueError("model.recursion (Mixture-of-Recursions) does not pass modality ids to its shared layers: "
                             "use moma FFNs without it, or model.depth_routing for MoMa's mixture-of-depths")
        if rc.sharing == "middle_cycle" and self.num_layers < 3:
            raise ValueError(f"model.recursion.sharing=middle_cycle keeps the first and last of model.num_layers="
                             f"{self.num_layers} unique and shares the ones between: needs num_layers >= 3")
        if rc.kv_cache == "shared":
            ends = 1 if rc.sharing == "middle_cycle" else 0
            mixers = {m for m, _ in self.layer_pattern()[ends:self.num_layers - ends]}
            if mixers != {"attention"}:
                raise ValueError(f"model.recursion.kv_cache=shared reads the first recursion's keys and values: the "
                                 f"shared layers must be attention, got {sorted(mixers)}")

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
        return (self._embeddings_and_norms() + sum(m.num_params() + f.num_params() for m, f in self.layer_configs())
                + self._router_params())

    def modality_groups(self) -> int | None:
        """The number of modalities the model routes by (its MoMa layers' groups), None without them."""
        return self.layer_settings("moma").num_modalities if "moma" in self.ffns else None

    def depth_routed(self, layer: int) -> bool:
        """Whether block `layer` is routed by Mixture-of-Depths (and has a router: capacity < 1)."""
        dr = self.depth_routing
        return dr is not None and dr.capacity < 1 and layer % dr.every == dr.every - 1

    def _router_params(self) -> int:
        """Mixture-of-Recursions: one router column [d_model] per recursion step; Mixture-of-Depths:
        one per routed block."""
        routed = self.recursion is not None and self.recursion.routing != "none"
        depth = sum(self.depth_routed(i) for i in range(self.num_layers))
        return self.d_model * (self.recursion.num_recursions if routed else depth)

    def num_active_params(self) -> int:
        """Parameters one token uses (mixture-of-experts layers count their router, top_k and shared
        experts only); equal to num_params() for a dense model."""
        return (self._embeddings_and_norms() + sum(_active(m) + _active(f) for m, f in self.layer_configs())
                + self._router_params())

    def _embeddings_and_norms(self) -> int:
        norms = (2 * self.num_layers + 1 + self.embedding_norm) * self.d_model
        return norms + self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)

    def flops_per_token(self, seq_len: int) -> int:
        """Forward-pass FLOPs per token (matmuls, 2 per multiply-add). Training is 3x this. With
        model.recursion: the shared layers count once per step for the share of tokens the step takes
        (training's capacities), each at the length of its shorter sequence; model.depth_routing: a
        routed block likewise, for its capacity."""
        if self.recursion is not None:
            return self._recursion_flops_per_token(seq_len) + 2 * self.d_model * self.vocab_size
        layers = 0
        for i, (m, f) in enumerate(self.layer_configs()):
            if self.depth_routed(i):   # Mixture-of-Depths: C of T tokens, at length C, and the router
                slots = self.depth_routing.slots(seq_len)
                layers += slots / seq_len * (m.flops_per_token(slots) + f.flops_per_token(slots)) + 2 * self.d_model
            else:
                layers += m.flops_per_token(seq_len) + f.flops_per_token(seq_len)
        return round(layers) + 2 * self.d_model * self.vocab_size

    def decoding_cache_bytes(self, max_len: int) -> int:
        """Bytes of one sequence's decoding cache of `max_len` tokens (`CausalLM.init_cache`), its
        counters aside: max_len kv_cache_bytes_per_token + state_bytes_per_sequence, except that a
        token-choice recursion step caches its slots, ceil(capacity max_len), not its share."""
        if self.recursion is None or self.recursion.routing != "token_choice":
            return round(max_len * self.kv_cache_bytes_per_token()) + self.state_bytes_per_sequence()
        rc = self.recursion
        first, shared, last = self.recursion_layers()
        steps = 1 if rc.kv_cache == "shared" else rc.num_recursions
        per_token = lambda layers: sum(c.kv_cache_bytes_per_token() for m, f in layers for c in (m, f))  # noqa: E731
        grown = per_token(first + last) * max_len + per_token(shared) * sum(rc.slots(max_len)[:steps])
        return round(grown) + self.state_bytes_per_sequence()

    def kv_cache_bytes_per_token(self) -> float:
        """Bytes one sequence's decoding cache grows by per token, over every layer (with
        model.recursion: each cached step's shared layers at the share of tokens the step takes)."""
        return self._cached(lambda c: c.kv_cache_bytes_per_token(), token_shares=True)

    def state_bytes_per_sequence(self) -> int:
        """Bytes of one sequence's decoding cache that do not grow with it (recurrent states,
        convolution tails), over every layer and cached recursion step."""
        return round(self._cached(lambda c: c.state_bytes_per_sequence(), token_shares=False))

    def _cached(self, bytes_of, *, token_shares: bool) -> float:
        """bytes_of(layer config) summed over the layers of the decoding cache; with model.recursion
        the shared layers count once per cached step, at the step's share of tokens if
        `token_shares` (token choice)."""
        total = lambda layers: sum(bytes_of(c) for m, f in layers for c in (m, f))  # noqa: E731
        if self.recursion is None:
            return total(self.layer_configs())
        rc = self.recursion
        first, shared, last = self.recursion_layers()
        steps = 1 if rc.kv_cache == "shared" else rc.num_recursions
        shares = rc.capacities() if token_shares and rc.routing == "token_choice" else [1.0] * rc.num_recursions
        return total(first + last) + sum(shares[:steps]) * total(shared)

    def recursion_layers(self) -> tuple[list, list, list]:
        """(first, shared, last) layer configs (mixer, ffn) of the Mixture-of-Recursions stack."""
        layers = self.layer_configs()
        ends = 1 if self.recursion.sharing == "middle_cycle" else 0
        return layers[:ends], layers[ends:len(layers) - ends], layers[len(layers) - ends:]

    def _recursion_flops_per_token(self, seq_len: int) -> int:
        rc = self.recursion
        first, shared, last = self.recursion_layers()
        total = sum(m.flops_per_token(seq_len) + f.flops_per_token(seq_len) for m, f in first + last)
        for r, slots in enumerate(rc.slots(seq_len)):
            share = slots / seq_len
            for m, f in shared:
                if rc.kv_cache == "shared" and r > 0:   # q and o projections; scores over all seq_len keys
                    mixer = 4 * m.d_model * m.num_heads * m.head_dim + 4 * seq_len * m.num_heads * m.head_dim
                else:
                    mixer = m.flops_per_token(slots)
                total += share * (mixer + f.flops_per_token(slots))
        if rc.routing == "token_choice":
            total += 2 * self.d_model * rc.num_recursions
        elif rc.routing == "expert_choice":
            total += 2 * self.d_model * sum(c < 1 for c in rc.capacities())
        return round(total)


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
