"""Peak FLOP/s per device for MFU: from a table for known accelerators (dense bf16, vendor
figures), otherwise measured once per machine with a large matmul and cached."""

import json
import os
import pathlib
import platform
import time

import jax
import jax.numpy as jnp

# Dense bf16 peak per device (FLOP/s), from the vendors' data sheets.
PEAK_TABLE = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}
CACHE = pathlib.Path(os.environ.get("HYBRAX_CACHE", "~/.cache/hybrax")).expanduser() / "peak_flops.json"


def _table_peak(kind: str) -> float | None:
    for name, peak in PEAK_TABLE.items():
        if name.lower() in kind.lower():
            return peak
    return None


def measure_matmul_peak(n: int = 2048, dtype=jnp.float32, repeats: int = 10) -> float:
    """FLOP/s of an n x n matmul on the default device, best of `repeats`."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def peak_flops_per_device(dtype: str = "bfloat16") -> tuple[float, str]:
    """(peak FLOP/s, how it was obtained) for jax.devices()[0] computing in `dtype`. Accelerators
    use their dense bf16 data-sheet figure; CPUs are measured in `dtype`."""
    device = jax.devices()[0]
    kind = getattr(device, "device_kind", device.platform)
    peak = _table_peak(kind)
    if peak is not None:
        return peak, f"{kind}: bf16 data-sheet peak"
    key = f"{platform.node()}|{kind}|{jax.device_count()}|{os.cpu_count()}|{dtype}"
    try:
        cached = json.loads(CACHE.read_text())
    except (OSError, ValueError):
        cached = {}
    if key not in cached:
        cached[key] = measure_matmul_peak(dtype=jnp.dtype(dtype)) / max(jax.local_device_count(), 1)
        try:
            CACHE.parent.mkdir(parents=True, exist_ok=True)
            CACHE.write_text(json.dumps(cached))
        except OSError:
            pass
    return cached[key], f"{kind}: measured {dtype} 2048^3 matmul peak"
