"""The shipped presets: `hybrax.configs.DIRECTORY / "quickstart.yaml"`; sweeps under `sweeps/`."""

import pathlib

DIRECTORY = pathlib.Path(__file__).parent
