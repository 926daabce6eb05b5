"""Run Python code in a subprocess with N fake CPU devices (XLA_FLAGS must be set before jax is
imported, so multi-device tests cannot run in the pytest process)."""

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]


def run_with_devices(code: str, devices: int = 8, timeout: int = 600) -> dict:
    """Run `code` with `devices` CPU devices; it must print one JSON object as its last line."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"subprocess failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
