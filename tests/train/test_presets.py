"""Presets: `base:` inheritance (deep merge, lists replace, chains, cycles in one line) and name
resolution (a path from the working directory first, then the shipped presets)."""

import pytest

from hybrax.configs import DIRECTORY
from hybrax.train.config import ConfigError, find_preset, load_config, read_preset


def test_base_is_merged_key_by_key_and_lists_replace(tmp_path):
    (tmp_path / "a.yaml").write_text("model: {d_model: 64, num_heads: 2, mixers: [gla, attention]}\n"
                                     "train: {steps: 10, seed: 3}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.yaml").write_text("base: ../a.yaml\nmodel: {mixers: [mamba2]}\ntrain: {steps: 20}\n")
    (tmp_path / "c.yaml").write_text("base: sub/b.yaml\nmodel: {d_model: 32}\n")
    tree = read_preset(tmp_path / "c.yaml")
    assert tree == {"model": {"d_model": 32, "num_heads": 2, "mixers": ["mamba2"]}, "train": {"steps": 20, "seed": 3}}
    config = load_config(tmp_path / "c.yaml", ["train.seed=5"])
    assert (config.model.d_model, config.model.mixers, config.train.steps, config.train.seed) == (32, ["mamba2"], 20, 5)


def test_base_cycle_fails_in_one_line(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"base presets form a cycle \(a.yaml -> b.yaml -> a.yaml\)") as info:
        load_config(tmp_path / "a.yaml")
    assert "\n" not in str(info.value)


def test_missing_base_names_the_path(tmp_path):
    (tmp_path / "a.yaml").write_text("base: gone.yaml\n")
    with pytest.raises(ConfigError, match="base 'gone.yaml' is neither in its folder, here, nor a shipped preset"):
        load_config(tmp_path / "a.yaml")


@pytest.mark.parametrize("name", ["quickstart", "quickstart.yaml", "configs/quickstart.yaml"])
def test_shipped_names_resolve_from_any_directory(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    assert find_preset(name) == DIRECTORY / "quickstart.yaml"
    assert find_preset("sweeps/tiny", DIRECTORY / "sweeps") == DIRECTORY / "sweeps" / "tiny.yaml"


def test_a_local_file_comes_before_a_shipped_preset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart.yaml").write_text("base: configs/quickstart.yaml\ntrain: {steps: 7}\n")
    assert load_config("quickstart.yaml").train.steps == 7     # its base: the shipped quickstart
    assert load_config("configs/quickstart.yaml").train.steps == 800
    with pytest.raises(ConfigError, match=r"'elsewhere/quickstart.yaml' does not exist, here or among the shipped"):
        find_preset("elsewhere/quickstart.yaml")
