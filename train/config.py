"""Typed run configuration: a YAML preset plus dotted `key=value` overrides, validated by pydantic.

    config = load_config("quickstart.yaml", ["model.num_layers=6", "optim.lr=1e-3"])

A preset may start `base: quickstart.yaml` and hold only what differs. A name is a path from the
working directory or a shipped preset's (`find_preset`).

Every problem found here is a `ConfigError` with a one-line message naming the key, raised before
any compute: unknown keys (with the closest valid key), wrong types, impossible shapes, missing
data files. `check_devices` adds the checks that need the device count (mesh, batch split).
"""

import difflib
import math
import pathlib
from typing import Literal

import pydantic
import yaml
from pydantic import model_validator

from hybrax.arch.config import ModelConfig, StrictConfig
from hybrax.configs import DIRECTORY
from hybrax.layers.sharding import MESH_AXES
from hybrax.train.tokenizer import load_tokenizer
from hybrax.train.settings import list_keys


class ConfigError(ValueError):
    """A configuration problem, one line, naming the key."""


class DataConfig(StrictConfig):
    source: Literal["shakespeare", "files", "synthetic", "prepared"] = "shakespeare"
    path: str | None = None                 # files: file or folder of .txt/.jsonl/.parquet/.arrow; prepared: its folder
    val_path: str | None = None             # files: validate on these files (then all of path trains)
    val_split: str = "val"                  # prepared: the split to validate on (hybrax-data prepare)
    text_field: str = "text"                # the text column of .jsonl / .parquet
    tokenizer: str = "bytes"                # "bytes", or a BPE tokenizer.json (hybrax-tokenizer train)
    val_plays: list[str] = ["hamlet", "the-tempest", "twelfth-night"]  # held out whole (shakespeare)
    val_fraction: float = 0.05              # documents held out (files, synthetic)
    seq_len: int = 256
    batch_size: int = 32                    # global rows per optimizer step (over all devices)
    # a modality id per token for MoMa (batch key modality_ids): none; script (shakespeare: speech 0;
    # scene headers, speaker headings and stage directions 1, from the plays' markup); or field (files:
    # each .jsonl record / .parquet row's modality_field, an id for the document or [start, end, id] spans)
    modalities: Literal["none", "script", "field"] = "none"
    modality_field: str = "modality"        # modalities=field: the record field holding the ids

    @model_validator(mode="after")
    def _check(self):
        if self.source in ("files", "prepared"):
            if not self.path:
                raise ValueError(f"data.path is required when data.source={self.source!r}")
            if not pathlib.Path(self.path).expanduser().exists():
                raise ValueError(f"data.path={self.path!r} does not exist")
        if self.val_path is not None:
            if self.source != "files":
                raise ValueError(f"data.val_path is for data.source='files' (source is {self.source!r}; prepared "
                                 "corpora name data.val_split)")
            if not pathlib.Path(self.val_path).expanduser().exists():
                raise ValueError(f"data.val_path={self.val_path!r} does not exist")
        if self.tokenizer != "bytes":
            load_tokenizer(self.tokenizer)   # a one-line ValueError naming the shipped ones when it cannot
        if self.seq_len < 1 or self.batch_size < 1:
            raise ValueError(f"data.seq_len={self.seq_len} and data.batch_size={self.batch_size} must be >= 1")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={self.val_fraction} must be in (0, 1)")
        needs = {"script": "shakespeare", "field": "files"}.get(self.modalities)
        if needs is not None and self.source != needs:
            raise ValueError(f"data.modalities={self.modalities!r} needs data.source={needs!r} (source is "
                             f"{self.source!r}); valid: script for shakespeare, field for files")
        return self


class AdamW8bitConfig(StrictConfig):
    block_size: int = 2048                  # elements per quantization block (one float32 absmax each); power of 2
    min_size: int = 4096                    # parameters with fewer elements keep 32-bit moments (norm scales)
    stable_embedding: bool = False          # 32-bit moments for the embedding, and model.embedding_norm on

    @model_validator(mode="after")
    def _check(self):
        b = self.block_size
        if b < 16 or b & (b - 1):
            raise ValueError(f"optim.adamw8bit.block_size={b} must be a power of two >= 16 (bitsandbytes: 64 to "
                             "4096; the paper's 2048)")
        if self.min_size < 0:
            raise ValueError(f"optim.adamw8bit.min_size={self.min_size} must be >= 0")
        return self


class GaLoreConfig(StrictConfig):
    rank: int = 0                           # the subspace's rank for every matrix; 0: rank_fraction of its smaller side
    rank_fraction: float = 0.25             # with rank 0: this share of each matrix's smaller side, rounded up
    update_interval: int = 200              # steps between SVD refreshes of the subspace (T)
    scale: float = 0.25                     # alpha: the projected-back update's scale

    @model_validator(mode="after")
    def _check(self):
        key = "optim.natural_galore" if isinstance(self, NaturalGaLoreConfig) else "optim.galore"
        checks = {"rank": (self.rank, ">= 0 (0: rank_fraction)", self.rank >= 0),
                  "rank_fraction": (self.rank_fraction, "in (0, 1]", 0 < self.rank_fraction <= 1),
                  "update_interval": (self.update_interval, ">= 1", self.update_interval >= 1),
                  "scale": (self.scale, "> 0", self.scale > 0)}
        for name, (value, valid, ok) in checks.items():
            if not ok:
                raise ValueError(f"{key}.{name}={value} must be {valid}")
        return self


class NaturalGaLoreConfig(GaLoreConfig):
    history: int = 4                        # s: low-rank gradients in the empirical Fisher
    damping: float = 1.0                    # lambda, relative to the window's mean squared gradient norm

    @model_validator(mode="after")
    def _check_fisher(self):
        if self.history < 1 or not self.damping > 0:
            raise ValueError(f"optim.natural_galore.history={self.history} must be >= 1 and "
                             f"optim.natural_galore.damping={self.damping} > 0")
        return self


class FrugalConfig(StrictConfig):
    projection: Literal["columns", "svd"] = "columns"   # the state-full part: random columns, or GaLore's subspace
    density: float = 0.25                   # its share of each matrix's columns (columns) or smaller side (svd)
    update_interval: int = 200              # steps between new state-full parts (moments restart)
    state_free: Literal["sign", "sgd"] = "sign"          # the rule for the rest of each gradient
    state_free_lr: float | None = None      # its peak learning rate (same schedule); None: optim.lr
    rest: Literal["adamw", "state_free"] = "adamw"      # non-matrix parameters (norms, embeddings)

    @model_validator(mode="after")
    def _check(self):
        if not 0 <= self.density <= 1:
            raise ValueError(f"optim.frugal.density={self.density} must be in [0, 1]")
        if self.update_interval < 1:
            raise ValueError(f"optim.frugal.update_interval={self.update_interval} must be >= 1")
        if self.state_free_lr is not None and not (math.isfinite(self.state_free_lr) and self.state_free_lr > 0):
            raise ValueError(f"optim.frugal.state_free_lr={self.state_free_lr} must be a finite number > 0, or null")
        return self


OPTIMIZERS = ("adamw", "adamw8bit", "galore", "natural_galore", "frugal")


class OptimConfig(StrictConfig):
    # adamw: optax AdamW; adamw8bit: 8-bit block-wise moments; galore / natural_galore: Adam in a
    # low-rank gradient subspace; frugal: AdamW on part of each gradient, signSGD on the rest
    name: Literal[OPTIMIZERS] = "adamw"
    lr: float = 3e-3                        # peak learning rate
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1               # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0                  # global-norm clipping; 0 disables
    adamw8bit: AdamW8bitConfig = AdamW8bitConfig()
    galore: GaLoreConfig = GaLoreConfig()
    natural_galore: NaturalGaLoreConfig = NaturalGaLoreConfig()
    frugal: FrugalConfig = FrugalConfig()

    @model_validator(mode="after")
    def _check(self):
        checks = {"lr": (self.lr, "a finite number > 0", math.isfinite(self.lr) and self.lr > 0),
                  "warmup_steps": (self.warmup_steps, ">= 0", self.warmup_steps >= 0),
                  "min_lr_ratio": (self.min_lr_ratio, "in [0, 1]", 0 <= self.min_lr_ratio <= 1),
                  "weight_decay": (self.weight_decay, ">= 0", self.weight_decay >= 0),
                  "beta1": (self.beta1, "in [0, 1)", 0 <= self.beta1 < 1),
                  "beta2": (self.beta2, "in [0, 1)", 0 <= self.beta2 < 1),
                  "eps": (self.eps, "> 0", self.eps > 0),
                  "grad_clip": (self.grad_clip, ">= 0 (0 disables)", self.grad_clip >= 0)}
        for key, (value, valid, ok) in checks.items():
            if not ok:   # NaN fails every comparison, so it lands here too
                raise ValueError(f"optim.{key}={value} must be {valid}")
        return self


class TrainConfig(StrictConfig):
    steps: int = 1000
    seed: int = 0
    grad_accum: int = 1                     # microbatches per step; batch_size splits evenly
    eval_every: int = 250
    eval_batches: int | None = None         # None: the whole validation set
    log_every: int = 10

    @model_validator(mode="after")
    def _check(self):
        for key in ("steps", "grad_accum", "eval_every", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key}={getattr(self, key)} must be >= 1")
        if self.eval_batches is not None and self.eval_batches < 1:
            raise ValueError(f"train.eval_batches={self.eval_batches} must be >= 1, or null for the whole "
                             "validation set")
        return self


class MeshConfig(StrictConfig):
    """Device counts per mesh axis; one axis may be -1 to take the remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    seq: int = 1
    expert: int = 1

    def shape(self, num_devices: int) -> dict[str, int]:
        sizes = {axis: getattr(self, axis) for axis in MESH_AXES}
        fill = [a for a, s in sizes.items() if s == -1]
        bad = [a for a, s in sizes.items() if s < 1 and s != -1]
        if bad or len(fill) > 1:
            raise ConfigError(f"mesh.{(bad or fill)[0]}={sizes[(bad or fill)[0]]}: axes are >= 1, and at most one is -1")
        fixed = math.prod(s for s in sizes.values() if s != -1)
        if fill:
            if num_devices % fixed:
                raise ConfigError(f"mesh.{fill[0]}=-1 cannot fill {num_devices} devices: the other axes multiply to {fixed}")
            sizes[fill[0]] = num_devices // fixed
        if math.prod(sizes.values()) != num_devices:
            raise ConfigError(f"mesh {sizes} has {math.prod(sizes.values())} devices, but {num_devices} are available")
        return sizes


class CheckpointConfig(StrictConfig):
    every: int = 250                        # steps between saves (and one at the end)
    keep: int = 2                           # most recent checkpoints kept
    async_save: bool = True

    @model_validator(mode="after")
    def _check(self):
        for key in ("every", "keep"):
            if getattr(self, key) < 1:
                raise ValueError(f"checkpoint.{key}={getattr(self, key)} must be >= 1")
        return self


class LogConfig(StrictConfig):
    tensorboard: bool = True
    progress_bar: bool = True
    sample_prompt: str = "ROMEO:"           # a sample is written at the end of the run
    sample_tokens: int = 200


class Config(StrictConfig):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()

    @model_validator(mode="before")
    @classmethod
    def _vocab_follows_the_tokenizer(cls, tree):
        """model.vocab_size, when not given, is the tokenizer's vocabulary size."""
        if not isinstance(tree, dict):
            return tree
        data, model = tree.get("data"), tree.get("model")
        spec = data.get("tokenizer", "bytes") if isinstance(data, dict) else getattr(data, "tokenizer", "bytes")
        if spec == "bytes" or isinstance(model, ModelConfig) or (isinstance(model, dict) and "vocab_size" in model):
            return tree
        try:
            vocab = load_tokenizer(spec).vocab_size
        except ValueError:
            return tree   # DataConfig reports it
        return {**tree, "model": {**(model or {}), "vocab_size": vocab}}

    @model_validator(mode="before")
    @classmethod
    def _stable_embedding_normalizes(cls, tree):
        """optim.adamw8bit.stable_embedding switches model.embedding_norm on unless it is given."""
        if not isinstance(tree, dict) or not isinstance(tree.get("optim"), dict):
            return tree
        knobs, model = tree["optim"].get("adamw8bit"), tree.get("model")
        stable = knobs.get("stable_embedding") if isinstance(knobs, dict) else getattr(knobs, "stable_embedding", False)
        if stable and isinstance(model, (dict, type(None))) and "embedding_norm" not in (model or {}):
            return {**tree, "model": {**(model or {}), "embedding_norm": True}}
        return tree

    @model_validator(mode="after")
    def _check(self):
        if self.optim.name == "adamw8bit" and self.optim.adamw8bit.stable_embedding and not self.model.embedding_norm:
            raise ValueError("optim.adamw8bit.stable_embedding=true needs model.embedding_norm=true (the stable "
                             "embedding normalizes the embedding's output); leave it unset to switch it on")
        vocab = load_tokenizer(self.data.tokenizer).vocab_size
        if self.model.vocab_size < vocab:
            raise ValueError(f"model.vocab_size={self.model.vocab_size} is smaller than data.tokenizer's "
                             f"{vocab} tokens; leave model.vocab_size unset to follow the tokenizer")
        if self.data.batch_size % self.train.grad_accum:
            raise ValueError(f"train.grad_accum={self.train.grad_accum} does not divide "
                             f"data.batch_size={self.data.batch_size}")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _set_dotted(tree: dict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    node = tree
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {'.'.join(parents[:i + 1])} is a value, not a section")
        node = child
    node[leaf] = value


def _parse_value(raw: str):
    """YAML scalars and lists (`6`, `1e-3`, `null`, `[a, b]`); other text stays a string (`ROMEO:`)."""
    if not raw.strip():
        return None
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    return raw if isinstance(value, dict) and not raw.lstrip().startswith("{") else value


def parse_overrides(overrides: list[str]) -> dict:
    """`["model.num_layers=6", "model.mixers=[gla, attention]"]` -> nested dict (YAML values)."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. model.num_layers=6)")
        _set_dotted(tree, key.strip(), _parse_value(raw))
    return tree


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _one_line(error: pydantic.ValidationError) -> str:
    first = error.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        close = difflib.get_close_matches(key, [row.key for row in list_keys()], n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown config key {key!r}{hint}"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "value_error":  # our own validators already name their keys
        return message
    return f"config key {key!r}: {message} (got {first.get('input')!r})"


def build_config(tree: dict) -> Config:
    try:
        return Config.model_validate(tree)
    except pydantic.ValidationError as e:
        raise ConfigError(_one_line(e)) from None


def find_preset(name: str | pathlib.Path, directory: pathlib.Path = DIRECTORY) -> pathlib.Path:
    """`name` as a path from the working directory if that file exists, else a shipped one in
    `directory` (the presets; `DIRECTORY / "sweeps"` for sweeps): `quickstart`, `quickstart.yaml`
    and `configs/quickstart.yaml` all find the shipped quickstart."""
    path = pathlib.Path(name).expanduser()
    if path.is_file():
        return path
    shipped = directory / (path.name if path.suffix else f"{path.name}.yaml")
    prefix = ("configs", *directory.relative_to(DIRECTORY).parts)   # the folders a shipped name may carry
    parents = path.parts[:-1]
    if not path.is_absolute() and prefix[len(prefix) - len(parents):] == parents and shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.name for p in directory.glob("*.yaml")))
    raise ConfigError(f"config file {str(name)!r} does not exist, here or among the shipped ones ({names})")


def read_preset(path: str | pathlib.Path, _chain: tuple[pathlib.Path, ...] = ()) -> dict:
    """The YAML tree of the preset at `path`, over the tree of its `base:` (a path from the preset's
    own folder, else `find_preset`'s; itself possibly based on another): sections merge key by key,
    lists replace."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    if path.resolve() in _chain:
        cycle = " -> ".join(p.name for p in (*_chain, path.resolve()))
        raise ConfigError(f"config file {str(path)!r}: base presets form a cycle ({cycle})")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(tree).__name__}")
    base = tree.pop("base", None)
    if base is None:
        return tree
    if not isinstance(base, str):
        raise ConfigError(f"config file {str(path)!r}: base={base!r} must be a preset's path, e.g. quickstart.yaml")
    try:
        found = path.parent / base if (path.parent / base).is_file() else find_preset(base)
    except ConfigError:
        raise ConfigError(f"config file {str(path)!r}: base {base!r} is neither in its folder, here, "
                          f"nor a shipped preset") from None
    return _merge(read_preset(found, (*_chain, path.resolve())), tree)


def load_config(path: str | pathlib.Path, overrides: list[str] = ()) -> Config:
    """The config of preset `path` (see `find_preset`; `base:` chains resolved) with `overrides`."""
    return build_config(_merge(read_preset(find_preset(path)), parse_overrides(list(overrides))))


def check_devices(config: Config, num_devices: int) -> dict[str, int]:
    """Checks that need the device count; returns the resolved mesh shape. Rows split over the
    mesh axes data, fsdp and expert (layers.sharding.RULES["batch"]); the sequence over seq, in
    2 * seq zigzag chunks (layers.sequence_parallel.layout)."""
    shape = config.mesh.shape(num_devices)
    shards = shape["data"] * shape["fsdp"] * shape["expert"]
    micro = config.data.batch_size // config.train.grad_accum
    if micro % shards:
        raise ConfigError(f"data.batch_size={config.data.batch_size} (per microbatch {micro}) is not divisible "
                          f"by the {shards} row shards (mesh.data * mesh.fsdp * mesh.expert)")
    if config.data.seq_len % (2 * shape["seq"]):
        raise ConfigError(f"data.seq_len={config.data.seq_len} is not divisible by 2 * mesh.seq = {2 * shape['seq']} "
                          f"(sequence parallelism splits it into 2 * seq zigzag chunks)")
    return shape
