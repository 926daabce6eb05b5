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


# Script text for the sequence-parallel collective tests: a residual stack of two layers of
# CONFIGS[name] (a dict the script defines before), and the arrays the compiled HLO's `op`
# instructions return (a combined collective returns a tuple of several; an async -start returns
# (operands, results): the results are kept).
STACK_AND_COLLECTIVES = r"""
class StackOfTwo(nnx.Module):
    def __init__(self, name):
        module, config = CONFIGS[name]
        self.layers = nnx.List([module(config, rngs=nnx.Rngs(seed)) for seed in range(2)])

    def __call__(self, x, segment_ids):
        for layer in self.layers:
            x = x + layer(x, segment_ids=segment_ids)
        return x

def gathered_arrays(text, op):
    shapes = []
    for result, kind in re.findall(r"= ((?:\([^=]*?\))|\S+) " + op + r"(-start)?\(", text):
        arrays = re.findall(r"[a-z0-9]+\[[0-9,]*\]", result)
        shapes += arrays[len(arrays) // 2:] if kind else arrays
    return shapes
"""
