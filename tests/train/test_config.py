"""Config loading: every preset loads, overrides apply, and every bad input fails before any
compute with one line naming the key."""

import math
import re
import pathlib
import subprocess
import sys

import pytest

from hybrax.train.config import ConfigError, MESH_AXES, check_devices, load_config, read_preset

ROOT = pathlib.Path(__file__).resolve().parents[2]
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


def test_there_are_presets():
    assert any(p.name == "quickstart.yaml" for p in PRESETS)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_preset_loads_and_names_the_required_keys(preset):
    raw = read_preset(preset)                 # its `base:` chain merged in
    assert "steps" in raw["train"] and "seed" in raw["train"], preset
    assert set(MESH_AXES) <= set(raw["mesh"]), preset
    config = load_config(preset)
    assert config.train.steps == raw["train"]["steps"]
    fixed = [getattr(config.mesh, axis) for axis in MESH_AXES if getattr(config.mesh, axis) > 0]
    check_devices(config, math.prod(fixed))   # the devices the preset asks for (1 for most)


def test_overrides_apply_with_yaml_types():
    config = load_config(ROOT / "configs/quickstart.yaml",
                         ["model.num_layers=6", "optim.lr=1e-3", "model.mixers=[attention, attention]",
                          "model.num_kv_heads=null", "log.sample_prompt=HAMLET:"])
    assert config.model.num_layers == 6 and config.optim.lr == 1e-3
    assert config.model.mixers == ["attention", "attention"] and config.model.num_kv_heads is None
    assert config.log.sample_prompt == "HAMLET:"


@pytest.mark.parametrize("override,message", [
    ("model.num_layerz=3", "unknown config key 'model.num_layerz' (did you mean 'model.num_layers'?)"),
    ("optim.learning_rate=1", "unknown config key 'optim.learning_rate'"),
    ("model.num_layers=six", "config key 'model.num_layers': Input should be a valid integer"),
    ("model.num_heads=6", "model.num_heads=6 does not divide model.d_model="),
    ("data.path=/does/not/exist", "data.path='/does/not/exist' does not exist"),
    ("model.mixers=[attention, hyena9]", "model.mixers: unknown mixer 'hyena9'"),
    ("train.grad_accum=3", "train.grad_accum=3 does not divide data.batch_size="),
    ("model.num_layers", "override 'model.num_layers' is not of the form key=value"),
    # values with a domain: refused before compute, not run as gradient ascent or an empty checkpoint dir
    ("optim.lr=-1", "optim.lr=-1.0 must be a finite number > 0"),
    ("optim.lr=.nan", "optim.lr=nan must be a finite number > 0"),
    ("optim.beta1=2", "optim.beta1=2.0 must be in [0, 1)"),
    ("optim.warmup_steps=-5", "optim.warmup_steps=-5 must be >= 0"),
    ("optim.grad_clip=-1", "optim.grad_clip=-1.0 must be >= 0"),
    ("checkpoint.keep=0", "checkpoint.keep=0 must be >= 1"),
    ("checkpoint.every=0", "checkpoint.every=0 must be >= 1"),
    ("train.eval_batches=0", "train.eval_batches=0 must be >= 1, or null"),
    ("model.mixers=[gla, gla, attention]", "model.mixers has 3 names for model.num_layers=4"),
])
def test_bad_overrides_fail_with_one_line(override, message):
    extra = ["data.source=files"] if override.startswith("data.path") else []
    with pytest.raises(ConfigError) as info:
        load_config(ROOT / "configs/quickstart.yaml", extra + [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file 'nope.yaml' does not exist"):
        load_config("nope.yaml")


@pytest.mark.parametrize("devices,overrides,message", [
    (4, ["data.batch_size=30"], "data.batch_size=30 (per microbatch 30) is not divisible by the 4 row shards"),
    (2, ["mesh.data=1", "mesh.tensor=4"], "has 4 devices, but 2 are available"),
    (6, ["mesh.tensor=4"], "mesh.data=-1 cannot fill 6 devices"),
    (8, ["mesh.seq=8", "data.seq_len=120"], "data.seq_len=120 is not divisible by 2 * mesh.seq = 16"),
])
def test_device_dependent_checks(devices, overrides, message):
    config = load_config(ROOT / "configs/quickstart.yaml", overrides)
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_devices(config, devices)


def cli(run_dir, *overrides):
    return subprocess.run([sys.executable, "-m", "hybrax.train", "--config", "configs/quickstart.yaml", "--run-dir",
                           str(run_dir), *overrides], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_cli_reports_bad_input_before_any_compute(tmp_path):
    """The command exits 2 with one line on stderr and creates no run directory."""
    run_dir = tmp_path / "run"
    result = cli(run_dir, "model.d_model=100", "model.num_heads=3")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: model.num_heads=3 does not divide model.d_model=100"
    assert not run_dir.exists() and result.stdout == ""


@pytest.mark.slow
def test_bad_input_leaves_an_existing_run_untouched(tmp_path):
    """A finished run, then reruns with a bad key, with another model (refused as a changed config) and
    with --resume into that model (its checkpoint does not fit)."""
    tiny = ["model.d_model=32", "model.num_layers=1", "model.num_heads=2", "data.seq_len=16", "data.batch_size=2",
            "train.steps=2", "train.eval_batches=1", "log.progress_bar=false", "log.sample_tokens=0"]
    assert cli(tmp_path, *tiny).returncode == 0
    before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    bad_key = cli(tmp_path, *tiny, "optim.lrr=1")
    assert bad_key.returncode == 2 and "did you mean 'optim.lr'" in bad_key.stderr
    changed = cli(tmp_path, *tiny, "model.d_model=64")
    assert changed.returncode == 2 and "started with another config: model.d_model: 32 -> 64" in changed.stderr
    mismatch = cli(tmp_path, "--resume", *tiny, "model.d_model=64")
    assert mismatch.returncode == 2 and "does not fit this config" in mismatch.stderr
    for result in (changed, mismatch):
        assert len([ln for ln in result.stderr.splitlines() if ln.startswith("error:")]) == 1
        assert "Traceback" not in result.stderr
    after = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    assert after == before
