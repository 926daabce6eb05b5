"""Which implementation of which op is verified on which backend: what `implementation="auto"`
may run.

A row is evidence, not a hope: an implementation is listed for a backend once it has matched its
op's `reference` there (outputs and every gradient, the op's test cases) or once it is an upstream
kernel whose own CI runs on that hardware. Backend "*" means every backend: plain XLA code that
lowers the same everywhere, matched against the reference on the CPU by the test suite.

Today no hybrax Pallas kernel has run on a real GPU or TPU, so none is listed: `auto` runs `xla`
(and the upstream kernels below) on every backend. Ring attention's splash block is not listed
either: it drives splash's private backward kernels with the ring's global log-sum-exp, which
jax's CI does not cover, and it has run only in TPU interpret mode. A forced name (`model.kernels.<op>=pallas_gpu`)
still runs an unlisted kernel. `experiments/bench/device_check.py` is the way in: run it on the
hardware, and add a row per kernel whose cases all passed there, with the jax version and date of
that run and the results file it wrote.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Verification:
    op: str               # the op's dispatch name (dot_product_attention, linear_attention, ...)
    backend: str          # "cpu", "gpu", "tpu" or "*"
    implementation: str
    jax_version: str      # the jax it was verified with ("upstream": the kernel ships with jax)
    date: str
    how: str


VERIFIED: tuple[Verification, ...] = (
    Verification("dot_product_attention", "*", "xla", "0.10.2", "2026-12-06",
                 "jax.nn.dot_product_attention(implementation='xla'); tests/pallas_kernels/test_dot_product_attention.py"),
    Verification("dot_product_attention", "gpu", "cudnn", "upstream", "-",
                 "jax.nn.dot_product_attention(implementation='cudnn'), covered by jax's GPU CI"),
    Verification("dot_product_attention", "tpu", "splash", "upstream", "-",
                 "jax.experimental.pallas.ops.tpu.splash_attention, covered by jax's TPU CI; hybrax's wrapper "
                 "matched the reference in TPU interpret mode"),
    Verification("ring_attention_block", "*", "xla", "0.10.2", "2026-12-06",
                 "jnp block of layers/softmax/ring_attention.py; tests/layers/test_ring_attention.py "
                 "(8 devices vs one)"),
    Verification("linear_attention", "*", "xla", "0.10.2", "2026-12-06",
                 "chunked jnp vs the float64 reference; tests/pallas_kernels/test_linear_attention.py"),
    Verification("mlstm", "*", "xla", "0.10.2", "2026-12-07",
                 "chunked jnp with a per-chunk stabiliser vs the float64 reference; tests/pallas_kernels/test_mlstm.py"),
    Verification("delta_rule", "*", "xla", "0.10.2", "2026-12-07",
                 "chunked WY form in jnp vs the float64 reference; tests/pallas_kernels/test_delta_rule.py"),
    Verification("slstm", "*", "xla", "0.10.2", "2026-12-07",
                 "lax.scan with its own backward vs the float64 reference; tests/pallas_kernels/test_slstm.py"),
    Verification("block_sparse_attention", "*", "xla", "0.10.2", "2026-12-06",
                 "block gather + jnp vs the reference; tests/pallas_kernels/test_block_sparse_attention.py"),
    Verification("grouped_matmul", "*", "xla", "0.10.2", "2026-12-06",
                 "padded batched einsum vs the reference; tests/pallas_kernels/test_grouped_matmul.py"),
    Verification("grouped_matmul", "gpu", "ragged_dot", "upstream", "-",
                 "jax.lax.ragged_dot, XLA's native op, covered by jax's GPU CI"),
    Verification("grouped_matmul", "tpu", "ragged_dot", "upstream", "-",
                 "jax.lax.ragged_dot, XLA's native op, covered by jax's TPU CI"),
)


def is_verified(op: str, backend: str, implementation: str) -> bool:
    return any(v.op == op and v.implementation == implementation and v.backend in (backend, "*") for v in VERIFIED)


def table() -> str:
    """The table as markdown (README and the run log point here)."""
    rows = ["| op | backend | implementation | jax | date | how verified |", "|---|---|---|---|---|---|"]
    rows += [f"| {v.op} | {v.backend} | {v.implementation} | {v.jax_version} | {v.date} | {v.how} |" for v in VERIFIED]
    return "\n".join(rows)
