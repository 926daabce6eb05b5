"""Packaging: every subpackage of the checkout is listed in pyproject.toml, and the wheel, installed
in a fresh virtual environment, trains and sweeps from an empty directory and installs nothing but
`hybrax` (and its console scripts)."""

import os
import pathlib
import shutil
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
FOLDERS = ("arch", "layers", "pallas_kernels", "train", "experiments", "configs")


def test_every_subpackage_is_listed():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = {".".join(("hybrax", *init.parent.relative_to(ROOT).parts))
             for folder in FOLDERS for init in (ROOT / folder).rglob("__init__.py")}
    assert found - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert {f"hybrax.{folder}" for folder in FOLDERS} <= found


def _run(command: list, cwd: pathlib.Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{command}: exit {result.returncode}\n{result.stdout[-2000:]}{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_wheel_installs_and_runs_from_an_empty_directory(tmp_path):
    """Build the wheel from a copy of the checkout, install it (dependencies from the package index)
    in a fresh venv outside the checkout, then train two steps and dry-run a shipped sweep."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "build", "*.egg-info",
                                                                "__pycache__", ".pytest_cache"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", tmp_path / "wheels", "."], source, env)
    (wheel,) = (tmp_path / "wheels").glob("hybrax-*.whl")
    _run([sys.executable, "-m", "venv", tmp_path / "venv"], tmp_path, env)
    bin_dir = tmp_path / "venv" / "bin"
    _run([bin_dir / "python", "-m", "pip", "install", "-q", wheel], tmp_path, env, timeout=900)

    work = tmp_path / "work"
    work.mkdir()
    env = {**env, "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"}
    tiny = ["model.d_model=64", "model.num_layers=1", "data.seq_len=32", "data.batch_size=4",
            "optim.warmup_steps=1", "train.steps=2", "train.eval_every=2", "train.eval_batches=1",
            "train.log_every=1", "log.progress_bar=false", "log.tensorboard=false", "log.sample_tokens=4",
            "checkpoint.every=2"]
    _run([bin_dir / "hybrax-train", "--config", "quickstart.yaml", "--run-dir", "run", *tiny], work, env)
    assert (work / "run" / "metrics.jsonl").is_file()
    _run([bin_dir / "hybrax-sweep", "tiny", "--dry-run"], work, env)

    show = _run([bin_dir / "python", "-m", "pip", "show", "-f", "hybrax"], work, env).stdout
    version = next(line.split()[1] for line in show.splitlines() if line.startswith("Version:"))
    files = [line.strip() for line in show.split("Files:", 1)[1].splitlines() if line.strip()]
    tops = {pathlib.PurePath(f).parts[0] for f in files if not f.startswith("../../../bin/")}
    assert tops == {"hybrax", f"hybrax-{version}.dist-info"}, tops
    assert {f for f in files if f.startswith("../../../bin/")} >= {
        f"../../../bin/hybrax-{name}" for name in ("train", "sample", "sweep", "fit", "compile", "tokenizer", "data")}
