"""Run outputs with the same numbers everywhere: `metrics.jsonl` (one JSON object per line),
TensorBoard scalars, and one console line per log step. A vector metric (e.g. a MoE layer's load
per expert) is a list in `metrics.jsonl` and a histogram in TensorBoard.

A run that starts at step S (resumed from checkpoint S, or 0) first drops the records of later
steps, which an earlier invocation wrote before it was killed and this one redoes: from
metrics.jsonl (rewritten atomically; a line cut short by the kill goes too) and from TensorBoard
(its purge step). Every step then appears once."""

import json
import math
import os
import pathlib

import numpy as np


class MetricsWriter:
    def __init__(self, run_dir: pathlib.Path, *, start: int = 0, tensorboard: bool = True):
        self.path = pathlib.Path(run_dir) / "metrics.jsonl"
        drop_records_after(self.path, start)
        self.file = self.path.open("a")
        self.tensorboard = None
        if tensorboard:
            from tensorboardX import SummaryWriter
            self.tensorboard = SummaryWriter(str(pathlib.Path(run_dir) / "tensorboard"), purge_step=start + 1)

    def write(self, step: int, metrics: dict) -> None:
        record = {"step": int(step), **{k: plain(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, step)
                elif isinstance(value, list):
                    self.tensorboard.add_histogram(key, np.asarray(value), step)

    def close(self) -> None:
        try:
            self.file.close()
        except OSError:   # the failed write was reported when it happened (train.loop); what it held is lost
            pass
        if self.tensorboard is not None:
            self.tensorboard.close()


def drop_records_after(path: pathlib.Path, step: int) -> int:
    """Keeps the records of steps <= `step` (and drops a line that does not parse); returns how many
    lines went."""
    if not path.exists():
        return 0
    lines = path.read_text().splitlines()
    kept = [line for line in lines if (at := _step_of(line)) is not None and at <= step]
    if len(kept) != len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return len(lines) - len(kept)


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def plain(value):
    """A JSON value: int, str or float for scalars, a list of floats for vectors."""
    if isinstance(value, (list, tuple)) or (hasattr(value, "ndim") and value.ndim > 0):
        return [float(v) for v in np.asarray(value).ravel()]
    value = value.item() if hasattr(value, "item") else value
    return value if isinstance(value, (int, str)) else float(value)


def console_line(step: int, total: int, m: dict) -> str:
    parts = [f"step {step:>6d}/{total}", f"loss {m['loss']:.4f}"]
    if "val_loss" in m:
        parts.append(f"val_loss {m['val_loss']:.4f} val_bpb {m['val_bpb']:.3f}")
    if any(k.startswith("aux/") for k in m):
        parts.append(f"aux_loss {m.get('aux_loss', 0.0):.4f}")
        imbalances = [v for k, v in m.items() if k.endswith("/imbalance")]
        if imbalances:
            parts.append(f"max load/mean {max(imbalances):.2f}")
    if "tokens_per_s" in m:
        parts += [f"tok/s {m['tokens_per_s']:,.0f}", f"TFLOP/s {m['tflops']:.3f}", f"MFU {100 * m['mfu']:.1f}%"]
    if "lr" in m:
        parts.append(f"lr {m['lr']:.2e}")
    return " | ".join(parts)


def is_finite(x: float) -> bool:
    return math.isfinite(x)
