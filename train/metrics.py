"""Run outputs with the same numbers everywhere: `metrics.jsonl` (one JSON object per line),
TensorBoard scalars, and one console line per log step."""

import json
import math
import pathlib


class MetricsWriter:
    def __init__(self, run_dir: pathlib.Path, *, tensorboard: bool = True):
        self.path = pathlib.Path(run_dir) / "metrics.jsonl"
        self.file = self.path.open("a")
        self.tensorboard = None
        if tensorboard:
            from tensorboardX import SummaryWriter
            self.tensorboard = SummaryWriter(str(pathlib.Path(run_dir) / "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, step)

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def _plain(value):
    value = value.item() if hasattr(value, "item") else value
    return value if isinstance(value, (int, str)) else float(value)


def console_line(step: int, total: int, m: dict) -> str:
    parts = [f"step {step:>6d}/{total}", f"loss {m['loss']:.4f}"]
    if "val_loss" in m:
        parts.append(f"val_loss {m['val_loss']:.4f} val_bpb {m['val_bpb']:.3f}")
    if any(k.startswith("aux/") for k in m):
        parts.append(f"aux_loss {m.get('aux_loss', 0.0):.4f}")
    if "tokens_per_s" in m:
        parts += [f"tok/s {m['tokens_per_s']:,.0f}", f"TFLOP/s {m['tflops']:.3f}", f"MFU {100 * m['mfu']:.1f}%"]
    if "lr" in m:
        parts.append(f"lr {m['lr']:.2e}")
    return " | ".join(parts)


def is_finite(x: float) -> bool:
    return math.isfinite(x)
