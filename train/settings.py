"""Every settable key with its type, default and one line of doc (`hybrax-train --list-keys`), and
the resolved config tree (`--print-config`).

The docs are the comments the config classes already carry: a comment after a field, or the
comment lines right above it. Layer keys come from the registry, so a newly registered mixer's
settings are listed (and settable) without touching this file.
"""

import dataclasses
import inspect
import re
import types
import typing

import pydantic

from hybrax.arch.registry import REGISTRIES
from hybrax.layers.config import LayerConfig, ModelShape


@dataclasses.dataclass(frozen=True)
class Key:
    key: str
    type: str
    default: str
    doc: str
    value: object = None        # the default itself (None where it is inherited from the model)


def list_keys() -> list[Key]:
    """The sections of the run config, then model.<layer>.<key> for every registered layer."""
    from hybrax.train.config import Config
    rows = _rows(Config, "")
    for registry in REGISTRIES:
        for name in registry.names():
            rows += _rows(registry.get(name).config, f"model.{name}.")
    return rows


def format_keys(rows: list[Key]) -> str:
    width = max(len(r.key) for r in rows)
    kind = max(len(r.type) for r in rows)
    return "\n".join(f"{r.key:<{width}}  {r.type:<{kind}}  {r.default}{'  # ' + r.doc if r.doc else ''}" for r in rows)


def resolved_tree(config) -> dict:
    """The config as a tree, with each layer the model uses shown as it is built (every value)."""
    tree = config.model_dump(mode="json")
    used = dict.fromkeys(name for pair in config.model.layer_pattern() for name in pair)
    for name in used:
        tree["model"][name] = config.model.layer_config(name).model_dump(mode="json")
    return tree


def _rows(cls: type[pydantic.BaseModel], prefix: str) -> list[Key]:
    docs = _field_docs(cls)
    rows = []
    for name, field in cls.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, pydantic.BaseModel):
            rows += _rows(sub, f"{prefix}{name}.")
            continue
        optional = [a for a in typing.get_args(sub) if isinstance(a, type) and issubclass(a, pydantic.BaseModel)]
        if optional:   # a section that is off (None) until one of its keys is set
            rows.append(Key(prefix + name, _type_name(sub), f"= {field.default!r}", docs.get(name, ""), field.default))
            rows += _rows(optional[0], f"{prefix}{name}.")
            continue
        if issubclass(cls, LayerConfig) and name == "d_model":
            continue   # always the model's residual width
        default = _default(cls, name, field)
        value = None if default.startswith("= model.") else field.default
        rows.append(Key(prefix + name, _type_name(sub), default, docs.get(name, ""), value))
    return rows


def _default(cls, name: str, field) -> str:
    if issubclass(cls, LayerConfig) and name not in cls().derived(ModelShape()):
        if name == "implementation" and cls.kernel is not None:
            return f"= model.kernels.{cls.kernel}"
        if name in {f.name for f in dataclasses.fields(ModelShape)}:
            return f"= model.{name}"
    return f"= {field.default!r}"


def _type_name(annotation) -> str:
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    if typing.get_origin(annotation) is typing.Literal:
        return "|".join(str(a) for a in typing.get_args(annotation))
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    return re.sub(r"typing\.|<class '(\w+)'>", lambda m: m.group(1) or "", str(annotation))


_FIELD = re.compile(r"^    (\w+)\s*:[^#]*?(?:#\s*(.*))?$")


def _field_docs(cls) -> dict[str, str]:
    """field -> its comment, from the class and its bases' source (subclasses win)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not (isinstance(klass, type) and issubclass(klass, pydantic.BaseModel)) or klass is pydantic.BaseModel:
            continue
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        above: list[str] = []
        for line in lines:
            stripped = line.strip()
            if stripped.startswith("#") and line.startswith("    #"):
                above.append(stripped.lstrip("#").strip())
                continue
            match = _FIELD.match(line)
            if match and match.group(1) in cls.model_fields:
                doc = match.group(2) or " ".join(above)
                if doc:
                    docs[match.group(1)] = doc
            above = []
    return docs
