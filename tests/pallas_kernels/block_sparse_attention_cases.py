"""Shared inputs and assertions for every implementation of `block_sparse_attention`.

A `Case` names one input configuration; `assert_matches_reference(impl, case)` runs the op with
`implementation=impl` and checks the output and the gradients of q, k and v (of a fixed random
linear functional of the output) against the dense reference run in float32 on the same inputs
(rounded to the case's dtype first, so only the implementation's own error is measured).

Block lists (`lists`):
- "random": each query block lists n_sel random key blocks, some slots -1, some duplicated,
  some rows entirely -1 (queries with no visible key must give zeros, not NaN);
- "full": every key block listed (with causal=True this is dense causal attention);
- "causal_random": random subsets of the causal blocks plus the diagonal block (what the layers
  produce).

Error measure: ||got - want|| / ||want|| per array (Frobenius norms). Tolerances: float32 1e-5;
bfloat16 2e-2 (outputs and gradients rounded to bfloat16, unit roundoff 2^-9, and bf16 matmul
operands; a wrong mask or block gives errors of order 1).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from hybrax.pallas_kernels.block_sparse_attention import block_sparse_attention
from refusals import ON_THE_OTHER_ACCELERATOR

FLOAT32_TOLERANCE = 1e-5
BFLOAT16_TOLERANCE = 2e-2

# Refusals on purpose (refusals.py): any other NotImplementedError on these cases is a failure.
# Only the kernel of the other accelerator: every case's blocks are multiples of 16, so the TPU
# kernel's sublane rule (tpu.py) never refuses them, and the GPU kernel pads any block.
REFUSED = [*ON_THE_OTHER_ACCELERATOR]


@dataclasses.dataclass(frozen=True)
class Case:
    T: int
    S: int | None = None          # None: S = T
    block_q: int = 16
    block_k: int = 16
    n_sel: int = 3
    lists: str = "random"         # "random", "full" or "causal_random"
    causal: bool = True
    segments: bool = False
    dtype: str = "float32"
    B: int = 2
    H: int = 4
    Hkv: int = 2
    D: int = 16
    seed: int = 0

    @property
    def id(self) -> str:
        parts = [f"T{self.T}", f"S{self.kv_len}", f"bq{self.block_q}", f"bk{self.block_k}", self.lists,
                 f"n{self.n_sel}", f"H{self.H}/{self.Hkv}", self.dtype]
        parts += ["noncausal"] * (not self.causal) + ["segments"] * self.segments
        return "-".join(parts)

    @property
    def kv_len(self) -> int:
        return self.T if self.S is None else self.S

    @property
    def tolerance(self) -> float:
        return BFLOAT16_TOLERANCE if self.dtype == "bfloat16" else FLOAT32_TOLERANCE


# The matrix every implementation runs: odd lengths, T not a multiple of the blocks, GQA, packed
# segments, empty rows, duplicates, full rows, unequal block sizes, bf16.
CASES = [
    Case(1, n_sel=1),
    Case(63, lists="random"),
    Case(65, lists="full"),
    Case(65, lists="causal_random", segments=True),
    Case(257, lists="causal_random", block_q=32, block_k=16, n_sel=4, B=1),
    Case(100, block_q=16, block_k=32, H=4, Hkv=1),
    Case(48, S=80, causal=False, H=2, Hkv=2),
    Case(65, lists="random", segments=True, dtype="bfloat16"),
    Case(96, lists="full", dtype="bfloat16", H=2, Hkv=1),
]


def block_indices(case: Case, rng: np.random.Generator) -> np.ndarray:
    """int32 [B, H, ceil(T / block_q), n_sel] per the case's `lists` rule."""
    B, H = case.B, case.H
    nq, nk = -(-case.T // case.block_q), -(-case.kv_len // case.block_k)
    if case.lists == "full":
        return np.broadcast_to(np.arange(nk, dtype=np.int32), (B, H, nq, nk)).copy()
    out = rng.integers(-1, nk, (B, H, nq, case.n_sel)).astype(np.int32)
    if case.lists == "causal_random":
        last_visible = (np.arange(nq) * case.block_q + case.block_q - 1) // case.block_k  # diagonal block
        last_visible = np.minimum(last_visible, nk - 1)
        out = np.minimum(out, last_visible[None, None, :, None])
        out[..., 0] = last_visible
    else:
        if case.n_sel > 1:                      # duplicates: slot 1 repeats slot 0 in every 3rd row
            out[:, :, ::3, 1] = out[:, :, ::3, 0]
        out[:, :, 1::5, :] = -1                 # empty rows
    return out


def make_inputs(case: Case) -> dict:
    """float32 numpy q, k, v (rounded to the case's dtype), int32 block_indices and segment_ids."""
    rng = np.random.default_rng(case.seed)
    B, T, S, H, Hkv, D = case.B, case.T, case.kv_len, case.H, case.Hkv, case.D
    round_to = lambda x: np.asarray(jnp.asarray(x, case.dtype).astype(jnp.float32))
    inputs = {"q": round_to(rng.standard_normal((B, T, H, D))),
              "k": round_to(rng.standard_normal((B, S, Hkv, D))),
              "v": round_to(rng.standard_normal((B, S, Hkv, D))),
              "block_indices": block_indices(case, rng),
              "segment_ids": None}
    if case.segments:  # about four segments per row
        starts = rng.random((B, T)) < 4.0 / max(T, 1)
        starts[:, 0] = True
        inputs["segment_ids"] = np.cumsum(starts, axis=1).astype(np.int32)
    return inputs


def run(impl, case: Case, inputs: dict, dtype) -> tuple[jax.Array, tuple]:
    """Output and (dq, dk, dv) of sum(o * w) for a fixed random w."""
    w = np.random.default_rng(case.seed + 1).standard_normal(inputs["q"].shape).astype(np.float32)
    kw = dict(block_size=(case.block_q, case.block_k), causal=case.causal,
              segment_ids=None if inputs["segment_ids"] is None else jnp.asarray(inputs["segment_ids"]),
              implementation=impl)
    idx = jnp.asarray(inputs["block_indices"])

    def loss(q, k, v):
        o = block_sparse_attention(q, k, v, idx, **kw)
        return jnp.sum(o.astype(jnp.float32) * w), o

    q, k, v = (jnp.asarray(inputs[n], dtype) for n in "qkv")
    (_, o), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return o, grads


def relative_error(got, want, zero_scale: float = 1e-30) -> float:
    """||got - want|| / ||want||; against an identically zero `want` the error is measured relative
    to `zero_scale` instead (a law, not a ratio: e.g. dq = dk = 0 when every row sees one key)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    norm = np.linalg.norm(want)
    return float(np.linalg.norm(got - want) / (norm if norm > 0 else max(zero_scale, 1e-30)))


def assert_matches_reference(impl, case: Case) -> dict:
    """Check output and dq, dk, dv against the reference; returns the errors by name."""
    inputs = make_inputs(case)
    got_o, got_grads = run(impl, case, inputs, case.dtype)
    want_o, want_grads = run("reference", case, inputs, jnp.float32)
    got_o = np.asarray(jnp.asarray(got_o, jnp.float32))
    assert np.all(np.isfinite(got_o)), f"{impl}: non-finite output"
    errors = {"o": relative_error(got_o, want_o)}
    # T = 1: softmax over a single key is constant, so the reference dq, dk are exactly 0 and a
    # flash-style backward (ds = p (dp - rowsum(do o))) leaves roundoff; measure it against the
    # largest reference gradient.
    grad_scale = max(np.linalg.norm(np.asarray(w, np.float64)) for w in want_grads)
    for name, g, w in zip("qkv", got_grads, want_grads):
        errors[f"d{name}"] = relative_error(jnp.asarray(g, jnp.float32), w, zero_scale=grad_scale)
    bad = {n: e for n, e in errors.items() if not e <= case.tolerance}
    assert not bad, f"{impl} {case.id}: relative errors {bad} exceed {case.tolerance}"
    return errors
