"""What a sweep keeps on disk between invocations: `results.jsonl` (read, and repaired when the
sweep was killed while appending to it) and each run's wall clock, `<run dir>/wall_s.json`, which
sums every invocation of the run, one a killed sweep left open included (hybrax.experiments.sweep)."""

import json
import os
import pathlib
import re
import sys
import time

WALL_FILE = "wall_s.json"    # in each run directory: the seconds of all the run's invocations


class SweepError(ValueError):
    """A problem with a sweep file or its results, one line."""


def read_jsonl(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _write_atomically(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_results(path: pathlib.Path, *, repair: bool = True) -> list[dict]:
    """The records in results.jsonl. A last line cut short (the sweep was killed while writing it) is
    dropped with a one-line warning, so its run is redone (and with `repair` the file is rewritten
    without it); a malformed line before the last is a SweepError."""
    if not path.exists():
        return []
    text = path.read_text()
    lines, records = text.splitlines(), []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
            if not isinstance(records[-1], dict) or not isinstance(records[-1].get("name"), str):
                raise ValueError("not a mapping with a name")
        except ValueError as e:
            if any(rest.strip() for rest in lines[number:]):
                raise SweepError(f"{path} line {number} is not a JSON record ({e}); fix or delete that line") from None
            name = re.search(r'"name": "([^"]*)"', line)
            print(f"warning: {path} line {number}{f' (run {name[1]})' if name else ''} was cut short, the sweep "
                  f"killed while writing it; {'dropped it, ' if repair else ''}that run is redone", file=sys.stderr)
            lines, text = lines[:number - 1], None
            break
    if repair and (text is None or not text.endswith("\n")):   # no partial line for the next append to join
        _write_atomically(path, "".join(line + "\n" for line in lines))
    return records


def completed(sweep_dir: pathlib.Path, *, repair: bool = True) -> set[str]:
    """The names of the runs recorded in <sweep dir>/results.jsonl (see read_results)."""
    return {r["name"] for r in read_results(sweep_dir / "results.jsonl", repair=repair)}


def _wall_clock(run_dir: pathlib.Path) -> dict:
    """<run dir>/wall_s.json: {"wall_s": seconds of the ended invocations, "running_since": the
    start, in epoch seconds, of one under way}."""
    path = run_dir / WALL_FILE
    return json.loads(path.read_text()) if path.exists() else {"wall_s": 0.0}


def _closed(state: dict, run_dir: pathlib.Path) -> dict:
    """An invocation left open by a sweep that was killed ends at its trainer's last write into the
    run directory (its log, metrics, or the lock it empties on exit)."""
    if "running_since" not in state:
        return state
    written = [p.stat().st_mtime for p in map(run_dir.joinpath, ("train.log", "metrics.jsonl", ".lock")) if p.exists()]
    return {"wall_s": state["wall_s"] + max(0.0, max(written, default=0.0) - state["running_since"])}


def closed_wall_clock(run_dir: pathlib.Path) -> dict:
    """The run's wall clock with an invocation left open by a killed sweep closed (see _closed)."""
    return _closed(_wall_clock(run_dir), run_dir)


def start_invocation(run_dir: pathlib.Path) -> None:
    """Marks a trainer invocation under way in <run dir>/wall_s.json."""
    state = closed_wall_clock(run_dir)
    _write_atomically(run_dir / WALL_FILE, json.dumps({**state, "running_since": time.time()}))


def end_invocation(run_dir: pathlib.Path, seconds: float) -> float:
    """Adds an ended invocation's seconds to <run dir>/wall_s.json; returns the run's total."""
    total = _wall_clock(run_dir)["wall_s"] + seconds
    _write_atomically(run_dir / WALL_FILE, json.dumps({"wall_s": total}))
    return total
