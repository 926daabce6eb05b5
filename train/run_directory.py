"""A run directory between invocations: what a rerun may reuse, and what it must not overwrite.

A run directory holds `config.yaml` (the resolved config the run was started with), its
checkpoints and its metrics. A rerun with the same resolved config resumes. A rerun whose
resolved config differs is refused in one line naming the differing keys, unless

    --resume   accept the change and continue from the latest checkpoint; the old config is kept
               as config.<step>.yaml (the step the new config takes over at)
    --fresh    start over at step 0; everything the directory held is moved, not deleted, into
               replaced/<UTC time>/

On resume at step S, `metrics.jsonl` keeps only the records of steps <= S (the ones the checkpoint
has seen), so a step redone after a kill appears once (train.metrics.MetricsWriter).
"""

import datetime
import enum
import pathlib

import yaml

from hybrax.train.config import Config, ConfigError, build_config
from hybrax.train.settings import resolved_tree

SHOWN_KEYS = 6   # differing keys named in the refusal line; the rest are counted


class OnChange(enum.Enum):
    REFUSE = "refuse"
    RESUME = "resume"
    FRESH = "fresh"


class ConfigChanged(ConfigError):
    """A rerun with a config other than the one the run directory was started with."""


def saved_steps(run_dir: pathlib.Path) -> list[int]:
    """Finished checkpoints (orbax renames a step's folder to its number when the save completes)."""
    folder = run_dir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """`key: old -> new` for every dotted key whose value differs (a key only one side has included)."""
    out = []
    for key in dict.fromkeys([*old, *new]):
        a, b, name = old.get(key, "<unset>"), new.get(key, "<unset>"), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{name}.")
        elif a != b:
            out.append(f"{name}: {a} -> {b}")
    return out


def check_config(run_dir: pathlib.Path, config: Config, on_change: OnChange) -> list[str]:
    """Refuses (ConfigChanged) a config that differs from the saved one unless `on_change` says
    what to do; returns the differences it accepted (empty when there are none)."""
    saved = run_dir / "config.yaml"
    if not saved.exists() or on_change is OnChange.FRESH:
        return []
    try:
        old = resolved_tree(build_config(yaml.safe_load(saved.read_text()) or {}))
    except (ConfigError, yaml.YAMLError) as e:
        raise ConfigError(f"{saved} no longer loads ({str(e).splitlines()[0]}); pass --fresh to start over "
                          "in this directory (the old run is moved aside) or use another --run-dir") from None
    changed = differences(old, resolved_tree(config))
    if changed and on_change is OnChange.REFUSE:
        steps = saved_steps(run_dir)
        at = f"at step {steps[-1]}" if steps else "with no checkpoint yet"
        more = f" (and {len(changed) - SHOWN_KEYS} more)" if len(changed) > SHOWN_KEYS else ""
        raise ConfigChanged(f"run directory {run_dir} holds a run {at} started with another config: "
                            f"{'; '.join(changed[:SHOWN_KEYS])}{more}. Pass --resume to continue it with this "
                            f"config (the old one is kept as config.<step>.yaml) or --fresh to start over (the "
                            f"old run is moved to {run_dir / 'replaced'}/)")
    return changed


def keep_old_config(run_dir: pathlib.Path, step: int) -> pathlib.Path:
    """Renames config.yaml to config.<step>.yaml (config.<step>.<n>.yaml if that is taken)."""
    target, n = run_dir / f"config.{step}.yaml", 1
    while target.exists():
        target, n = run_dir / f"config.{step}.{n}.yaml", n + 1
    (run_dir / "config.yaml").rename(target)
    return target


def move_aside(run_dir: pathlib.Path) -> pathlib.Path | None:
    """Moves everything the run directory holds (but its lock and earlier replaced runs) into
    replaced/<UTC time>/; returns that folder, or None when there was nothing to move."""
    held = [p for p in run_dir.iterdir() if p.name not in (".lock", "replaced")]
    if not held:
        return None
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    target = run_dir / "replaced" / stamp
    target.mkdir(parents=True)
    for path in held:
        path.rename(target / path.name)
    return target


def check_steps(run_dir: pathlib.Path, config: Config, start: int) -> None:
    if config.train.steps < start:
        raise ConfigError(f"train.steps={config.train.steps} is below the checkpoint this run resumes from (step "
                          f"{start} in {run_dir / 'checkpoints'}): nothing to train; raise train.steps or pass "
                          "--fresh to start over")
