"""Sweep records: read `results.jsonl`, check them, pick the parameter count N and group them.

One record per training run, as `hybrax-sweep` appends it: `name`, `arch`,
`overrides` ("key=value" strings), `params`, `non_embedding_params`, `active_params`, `tokens`,
`flops` (3 x forward FLOPs per token x tokens, 2 FLOPs per multiply-add), `val_loss` (nats per
token), `val_bpb`, `wall_s`.
"""

import json
import math
import pathlib
from collections.abc import Iterable, Sequence

import numpy as np

PARAMS_KEYS = ("params", "non_embedding_params", "active_params", "average")


def load_records(path: str | pathlib.Path) -> list[dict]:
    """Records of `path` (a results.jsonl, or a sweep folder holding one); blank lines skipped."""
    path = pathlib.Path(path)
    if path.is_dir():
        path = path / "results.jsonl"
    if not path.exists():
        raise ValueError(f"no results file at {path}")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number} is not JSON: {error.msg}") from None
    return records


def _name(record: dict, index: int) -> str:
    return str(record.get("name", f"record {index}"))


def column(records: Sequence[dict], key: str) -> np.ndarray:
    """float64 values of `key` over `records`; ValueError on a missing, non-finite or non-positive one."""
    values = np.empty(len(records))
    for index, record in enumerate(records):
        if key not in record:
            raise ValueError(f"{_name(record, index)!r} has no key {key!r}")
        try:
            value = float(record[key])
        except (TypeError, ValueError):
            raise ValueError(f"{_name(record, index)!r}: {key}={record[key]!r} is not a number") from None
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{_name(record, index)!r}: {key}={value!r} must be finite and positive")
        values[index] = value
    return values


def param_counts(records: Sequence[dict], params_key: str = "params") -> np.ndarray:
    """N per record. `params_key` is a record key, or "average": the geometric mean
    sqrt(params * active_params), the midpoint of total and active in log N (where the law is
    linear); it equals `params` for a dense model and sits between the two for a sparse one."""
    if params_key not in PARAMS_KEYS:
        raise ValueError(f"params_key={params_key!r}; valid: {', '.join(PARAMS_KEYS)}")
    if params_key == "average":
        return np.sqrt(column(records, "params") * column(records, "active_params"))
    return column(records, params_key)


def law_arrays(records: Sequence[dict], params_key: str = "params", min_records: int = 1):
    """(N, D, L) float64 arrays of `records`: parameters, `tokens`, `val_loss`, all checked."""
    records = list(records)
    if len(records) < min_records:
        raise ValueError(f"{len(records)} records; the fit needs at least {min_records}")
    return param_counts(records, params_key), column(records, "tokens"), column(records, "val_loss")


def override_value(record: dict, key: str):
    """The value of `key` in the record itself or, failing that, in its "key=value" overrides."""
    if key in record:
        return record[key]
    for override in record.get("overrides", []):
        name, _, value = str(override).partition("=")
        if name == key:
            return value
    return None


def group_by(records: Iterable[dict], key: str = "arch") -> dict[str, list[dict]]:
    """Records grouped by `record[key]` (or its override), groups in order of first appearance."""
    groups: dict[str, list[dict]] = {}
    for index, record in enumerate(records):
        value = override_value(record, key)
        if value is None:
            raise ValueError(f"{_name(record, index)!r} has no key {key!r}")
        groups.setdefault(str(value), []).append(record)
    return groups


def split_finite_loss(records: Iterable[dict]) -> tuple[list[dict], list[dict]]:
    """(records with a finite val_loss, the others: diverged or unfinished runs)."""
    kept, dropped = [], []
    for record in records:
        try:
            finite = math.isfinite(float(record.get("val_loss", float("nan"))))
        except (TypeError, ValueError):
            finite = False
        (kept if finite else dropped).append(record)
    return kept, dropped
