"""The kernel benchmarks of the device check (device_check.py): each op's implementations against
a baseline in the same run, forward and forward + backward, with the output's relative error
against the baseline's (a wrong kernel shows here even when it is fast).

- linear_attention: xla (baseline), the Pallas kernel of the backend, and flash-linear-attention's
  Triton kernels (`fla.ops`: chunk_gla, chunk_simple_gla, chunk_linear_attn) where `import torch,
  fla` works and torch sees a GPU; per-channel, scalar and no decay;
- block_sparse_attention: xla (baseline) and the Pallas kernel, causal block lists at two densities;
- dot_product_attention: xla (baseline), cudnn, splash, pallas_gpu (those registered in
  `IMPLEMENTATIONS`), causal, with and without packed segment ids;
- grouped_matmul: xla (baseline), ragged_dot and one dense x @ w of the same FLOPs.

An implementation that refuses the inputs (NotImplementedError) or fails is a row that says so.
JAX rows use `timing.best_time` (compilation and one warm-up excluded, best of `repeats`); torch
rows time with CUDA events after a warm-up. Every row is skipped once the deadline has passed.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from hybrax.experiments.bench.grouped_matmul import group_sizes, programs as grouped_programs
from hybrax.experiments.bench.sparse_attention_gpu import causal_block_lists, timed_pair
from hybrax.experiments.bench.timing import best_time
from hybrax.pallas_kernels.block_sparse_attention import block_sparse_attention
from hybrax.pallas_kernels.dot_product_attention import dot_product_attention
from hybrax.pallas_kernels.dot_product_attention.api import IMPLEMENTATIONS as DENSE_IMPLEMENTATIONS
from hybrax.pallas_kernels.grouped_matmul import grouped_matmul
from hybrax.pallas_kernels.implementation import current_backend
from hybrax.pallas_kernels.linear_attention import linear_attention

# Training-like shapes, sized so that the whole section runs in about two minutes on one H100.
FULL = dict(B=8, T=2048, H=8, D=128, block=64, densities=(4, 8), M=16384, K=1024, N=2048, groups=(8, 64),
            repeats=5, dtype="bfloat16", gates=("channel", "scalar", None), segments=(False, True),
            loads=("balanced", "random"))
# The dry run (a CPU, Pallas in interpret mode): one case of each op.
TINY = dict(B=1, T=64, H=2, D=16, block=16, densities=(2,), M=64, K=16, N=32, groups=(4,), repeats=1,
            dtype="float32", gates=("channel",), segments=(True,), loads=("random",))
# speedup: the baseline's time / this time (above 1: faster than the baseline)
COLUMNS = ["case", "implementation", "fwd ms", "fwd+bwd ms", "fwd speedup", "fwd+bwd speedup",
           "rel. error vs baseline"]


def pallas_name() -> str:
    return "pallas_tpu" if current_backend() == "tpu" else "pallas_gpu"


def relative_error(got, want) -> float:
    got, want = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (got, want))
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


class Table:
    """Rows of one benchmark; in each case, the first implementation is the baseline."""

    def __init__(self, title: str, deadline: float):
        self.title, self.deadline, self.rows = title, deadline, []
        self._baseline: dict[str, tuple | None] = {}

    def add(self, case: str, name: str, measure, compare: bool = True) -> None:
        """measure() -> (forward s, forward+backward s, output); an exception becomes the row's note.
        compare=False: the output is another quantity (no error column)."""
        first = case not in self._baseline
        if time.monotonic() > self.deadline:
            result = "skipped: out of time"
        else:
            try:
                result = measure()
            except Exception as e:  # noqa: BLE001 - a refusal or a broken kernel is a result here
                result = first_line(e)
        if first:
            self._baseline[case] = None if isinstance(result, str) else result
        if isinstance(result, str):
            self.rows.append([case, name, None, None, None, None, result])
            return
        forward, both, out = result
        base = self._baseline[case]
        ratios = (None, None) if base is None else (base[0] / forward, base[1] / both)
        error = None if base is None or not compare else relative_error(out, base[2])
        self.rows.append([case, name, 1e3 * forward, 1e3 * both, *ratios, error])

    def note(self, case: str, name: str, text: str) -> None:
        self.rows.append([case, name, None, None, None, None, text])

    def as_dict(self) -> dict:
        return {"title": self.title, "columns": COLUMNS, "rows": self.rows}


def markdown(table: dict) -> str:
    """A table from as_dict() in markdown."""
    def cell(value, column):
        if value is None:
            return "-"
        if isinstance(value, str):
            return value
        if "speedup" in column:
            return f"{value:.2f}x"
        return f"{value:.1e}" if "error" in column else f"{value:.2f}"
    lines = [f"{table['title']}", "", "| " + " | ".join(table["columns"]) + " |",
             "|" + "---|" * len(table["columns"])]
    lines += ["| " + " | ".join(cell(v, c) for v, c in zip(row, table["columns"])) + " |" for row in table["rows"]]
    return "\n".join(lines)


# --- flash-linear-attention (torch + Triton) ---------------------------------------------------

def fla_kernels():
    """{gates: fla function} where torch, fla and a CUDA device are there; else the reason why not."""
    try:
        import torch
        from fla.ops.gla import chunk_gla
        from fla.ops.linear_attn import chunk_linear_attn
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as e:  # noqa: BLE001 - fla is optional
        return f"fla not importable ({first_line(e)})"
    if not torch.cuda.is_available():
        return "fla needs a CUDA device (torch.cuda.is_available() is False)"
    return {"channel": lambda q, k, v, g, scale: chunk_gla(q, k, v, g, scale=scale)[0],
            "scalar": lambda q, k, v, g, scale: chunk_simple_gla(q, k, v, g, scale=scale)[0],
            None: lambda q, k, v, g, scale: chunk_linear_attn(q, k, v, scale=scale, normalize=False)[0]}


def torch_best_time(fn, repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls of fn(), CUDA events, after one warm-up call."""
    import torch
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return min(times)


def fla_measure(fla_fn, arrays, scale: float, repeats: int):
    import torch
    to_torch = lambda x, dtype: None if x is None else torch.tensor(  # noqa: E731
        np.asarray(jnp.asarray(x, jnp.float32)), device="cuda").to(dtype)
    q, k, v = (to_torch(x, torch.bfloat16 if arrays[0].dtype == jnp.bfloat16 else torch.float32) for x in arrays[:3])
    g, w = to_torch(arrays[3], torch.float32), to_torch(arrays[4], torch.float32)
    leaves = [x.requires_grad_() for x in (q, k, v, g) if x is not None]

    def both():
        for x in leaves:
            x.grad = None
        (fla_fn(q, k, v, g, scale).float() * w).sum().backward()

    with torch.no_grad():
        forward = torch_best_time(lambda: fla_fn(q, k, v, g, scale), repeats)
        out = fla_fn(q, k, v, g, scale).float().cpu().numpy()
    return forward, torch_best_time(both, repeats), out


# --- the four ops ------------------------------------------------------------------------------

def linear_attention_table(s: dict, deadline: float) -> dict:
    B, T, H, D, dtype = s["B"], s["T"], s["H"], s["D"], jnp.dtype(s["dtype"])
    table = Table(f"linear_attention: B={B} T={T} H={H} K=V={D} {dtype.name}, chunk 64, best of {s['repeats']}",
                  deadline)
    fla = fla_kernels()
    keys = jax.random.split(jax.random.key(0), 5)
    q, k, v = (jax.random.normal(key, (B, T, H, D), jnp.float32).astype(dtype) for key in keys[:3])
    w = jax.random.normal(keys[4], (B, T, H, D), jnp.float32)
    for gates in s["gates"]:
        shape = {"channel": (B, T, H, D), "scalar": (B, T, H)}.get(gates)
        g = None if gates is None else jax.nn.log_sigmoid(jax.random.normal(keys[3], shape) + 3.0)
        case = f"decay={gates}"
        for name in ("xla", pallas_name()):
            def measure(name=name, g=g):
                forward = jax.jit(lambda q, k, v, g: linear_attention(q, k, v, g, implementation=name)[0])
                loss = lambda q, k, v, g: jnp.sum(forward(q, k, v, g).astype(jnp.float32) * w)  # noqa: E731
                both = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2) if g is None else (0, 1, 2, 3)))
                return (best_time(forward, (q, k, v, g), s["repeats"]), best_time(both, (q, k, v, g), s["repeats"]),
                        forward(q, k, v, g))
            table.add(case, name, measure)
        fla_name = {"channel": "fla chunk_gla", "scalar": "fla chunk_simple_gla", None: "fla chunk_linear_attn"}[gates]
        if isinstance(fla, str):
            table.note(case, fla_name, fla)
        else:
            table.add(case, fla_name, lambda gates=gates, g=g: fla_measure(fla[gates], (q, k, v, g, w), D ** -0.5,
                                                                             s["repeats"]))
    return table.as_dict()


def block_sparse_attention_table(s: dict, deadline: float) -> dict:
    B, T, H, D, block, dtype = s["B"], s["T"], s["H"], s["D"], s["block"], jnp.dtype(s["dtype"])
    table = Table(f"block_sparse_attention: B={B} T={T} H={H} D={D} {dtype.name}, causal block lists, "
                  f"blocks of {block}, best of {s['repeats']}", deadline)
    keys = jax.random.split(jax.random.key(1), 4)
    q, k, v = (jax.random.normal(key, (B, T, H, D), jnp.float32).astype(dtype) for key in keys[:3])
    w = jax.random.normal(keys[3], (B, T, H, D), jnp.float32)
    for density in s["densities"]:
        idx = jnp.asarray(causal_block_lists(np.random.default_rng(density), B, H, -(-T // block), density))
        for name in ("xla", pallas_name()):
            attend = lambda q, k, v, idx, name=name: block_sparse_attention(  # noqa: E731
                q, k, v, idx, block_size=block, implementation=name)
            table.add(f"1/{density} of causal blocks", name,
                      lambda attend=attend, idx=idx: (*timed_pair(attend, q, k, v, w, idx, repeats=s["repeats"]),
                                                      jax.jit(attend)(q, k, v, idx)))
    return table.as_dict()


def dot_product_attention_table(s: dict, deadline: float) -> dict:
    B, T, H, D, dtype = s["B"], s["T"], s["H"], s["D"], jnp.dtype(s["dtype"])
    table = Table(f"dot_product_attention: B={B} T={T} H={H} D={D} {dtype.name}, causal, best of {s['repeats']}",
                  deadline)
    keys = jax.random.split(jax.random.key(2), 4)
    q, k, v = (jax.random.normal(key, (B, T, H, D), jnp.float32).astype(dtype) for key in keys[:3])
    w = jax.random.normal(keys[3], (B, T, H, D), jnp.float32)
    starts = np.random.default_rng(2).random((B, T)) < 4.0 / T      # about four documents per row
    segments = jnp.asarray(np.cumsum(starts, axis=1), jnp.int32)
    names = [n for n in ("xla", "cudnn", "splash", "pallas_gpu") if n in DENSE_IMPLEMENTATIONS]
    for case, seg in [("causal, packed segment ids", segments) if packed else ("causal", None)
                      for packed in s["segments"]]:
        for name in names:
            attend = lambda q, k, v, seg, name=name: dot_product_attention(  # noqa: E731
                q, k, v, causal=True, segment_ids=seg, implementation=name)
            table.add(case, name, lambda attend=attend, seg=seg: (*timed_pair(attend, q, k, v, w, seg,
                                                                              repeats=s["repeats"]),
                                                                   jax.jit(attend)(q, k, v, seg)))
    return table.as_dict()


def grouped_matmul_table(s: dict, deadline: float) -> dict:
    M, K, N, dtype = s["M"], s["K"], s["N"], jnp.dtype(s["dtype"])
    table = Table(f"grouped_matmul: lhs [{M}, {K}] x rhs [G, {K}, {N}] {dtype.name}, best of {s['repeats']}; "
                  "dense: one x @ w [K, N] of the same FLOPs", deadline)
    keys = jax.random.split(jax.random.key(3), 3)
    lhs = jax.random.normal(keys[0], (M, K), jnp.float32).astype(dtype)
    cotangent = jax.random.normal(keys[2], (M, N), jnp.float32).astype(dtype)
    for G in s["groups"]:
        rhs = (jax.random.normal(keys[1], (G, K, N), jnp.float32) / np.sqrt(K)).astype(dtype)
        for load in s["loads"]:
            sizes = group_sizes(M, G, load)
            for name in ("xla", "ragged_dot", "dense"):
                if name == "dense":
                    product, weight = (lambda x, w: x @ w), rhs[0]
                else:
                    product = lambda x, w, sizes=sizes, name=name: grouped_matmul(  # noqa: E731
                        x, w, sizes, implementation=name)
                    weight = rhs

                def measure(product=product, weight=weight):
                    forward, both = grouped_programs(product)
                    return (best_time(forward, (lhs, weight), s["repeats"]),
                            best_time(both, (lhs, weight, cotangent), s["repeats"]), forward(lhs, weight))
                table.add(f"G={G} {load}", name, measure, compare=name != "dense")  # dense: another product
    return table.as_dict()


TABLES = {"linear_attention": linear_attention_table, "block_sparse_attention": block_sparse_attention_table,
          "dot_product_attention": dot_product_attention_table, "grouped_matmul": grouped_matmul_table}


def run_benchmarks(sizes: dict, deadline: float, log=print) -> dict:
    """{op: table} for every op, printed as it completes."""
    tables = {}
    for op, make in TABLES.items():
        try:
            tables[op] = make(sizes, deadline)
        except Exception as e:  # noqa: BLE001 - one op's failure leaves the others' tables
            tables[op] = {"title": op, "columns": COLUMNS, "rows": [], "error": first_line(e)}
        log(markdown(tables[op]) + (f"\nerror: {tables[op]['error']}" if "error" in tables[op] else "") + "\n")
    if not isinstance(fla_kernels(), str):
        import torch
        torch.cuda.empty_cache()   # leave the GPU memory torch cached to the training runs
    return tables
