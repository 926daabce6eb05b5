"""Causal routing of the Union-of-Experts layers (Yang et al., 2025, "Union of Experts: Adapting
Hierarchical Routing to Equivalently Decomposed Transformer") at static shapes.

UoE cuts a dense block into experts along the tensor-parallel split of its matrices (attention
heads, SwiGLU hidden columns), so the sum of all experts' outputs IS the dense block; a router
decides which experts run on which tokens. Two modes (`routing`):

- expert_selection: the unit is a token; it offers itself to the top_k experts of its own scores,
      s_t = softmax(x_t W_router)  [E],        offer_{t,e} = e in top_k(s_t)
- patch_selection: the unit is a patch of `patch_size` = P consecutive tokens of a document (patch
  j holds positions [j P, (j + 1) P); a document start also starts a patch). The patch's scores and
  offers are those of its FIRST token, so every token of the patch uses a choice made from
  positions <= the patch start (the rule of layers/sparse/block_selection.py).

Data selection, made causal. In the paper each expert ranks the units offered to it over the whole
sequence and keeps the best `max_len`: that reads future tokens. Here each expert takes the units
offered to it in order of position while it is under a running budget:

    take_{u,e} = offer_{u,e} and n_e(u) < L(j_u),     L(j) = ceil(rho (j + 1)),
    rho = min(1, capacity_factor top_k / E)

with n_e(u) the units expert e took before u in u's document and j_u the unit's index in its
document (position // P). Among the first j + 1 units of a document an expert takes at most L(j):
a later token never changes an earlier choice, the budget does not depend on the sequence length,
and decoding, which carries n_e and the current patch's choice in its cache, takes exactly the
units the parallel form takes. Counts restart at a document start (a change of segment id, or a
position that does not grow). n is a prefix of the min-plus maps c -> min(c + a, b), composed with
an associative scan (log depth, no loop over tokens).

Static shapes. Expert e's taken tokens fill a buffer of C = min(T, ceil(rho N) P) token slots per
row, in order of position (N = ceil(T / P) units; P = 1 in expert_selection): one document never
overflows it; in a row packing several documents their budgets can sum past it, and the tokens past
the buffer are dropped (still causal; counted in `dropped_fraction`).

Gate. A running expert's output enters with g = 1 + (s - stop_gradient(s)), s its router score for
the unit: the forward value is exactly 1, so with every expert taking every token (top_k = E,
capacity_factor >= 1) the layer IS the dense block, up to the order of the float32 sums; the
gradient d g / d s = 1 teaches the router <dL/dy, y_e>, how much expert e's output helps (a
straight-through gate). Weighting by s, as the MoE layer does, would break the decomposition law.

Balance (training mode): the switch loss E sum_e f_e p_e over the routing units (f: share of the
offers, p: mean score; layers/moe/balancing.py), and metrics `load` (each expert's share of the
(token, expert) pairs that ran), `imbalance` (max / mean of those counts) and `dropped_fraction`
(offered pairs refused by the budgets or the buffer).
"""

import math
from fractions import Fraction
from typing import NamedTuple

import jax
import jax.numpy as jnp
from pydantic import model_validator

from hybrax.layers.auxiliary import report_loss, report_metric
from hybrax.layers.config import LayerConfig
from hybrax.layers.moe import balancing

ROUTINGS = ("expert_selection", "patch_selection")
BIG = 1 << 29   # "no limit" in the min-plus maps; sums of two stay inside int32


class UnionRoutingConfig(LayerConfig):
    """The routing settings both Union-of-Experts layers share (see the module docstring)."""

    num_experts: int | None = None
    top_k: int = 2                      # experts a token (expert_selection) or a patch offers itself to
    routing: str = "expert_selection"   # expert_selection | patch_selection
    patch_size: int = 16                # P, tokens per patch (patch_selection)
    capacity_factor: float = 1.25       # budget rho = min(1, capacity_factor top_k / E) of the units (slot modes)
    balance_loss_weight: float = 0.01   # switch loss E sum_e f_e p_e over the routing units (0: off)

    @model_validator(mode="after")
    def _check_routing(self):
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing={self.routing!r} is not one of {ROUTINGS}")
        if self.num_experts is not None and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")
        if self.patch_size < 1 or self.capacity_factor <= 0 or self.balance_loss_weight < 0:
            raise ValueError(f"patch_size={self.patch_size} must be >= 1, capacity_factor={self.capacity_factor} "
                             f"> 0 and balance_loss_weight={self.balance_loss_weight} >= 0")
        return self

    @property
    def unit(self) -> int:
        """Tokens per routing unit: patch_size in patch_selection, 1 in expert_selection."""
        return self.patch_size if self.routing == "patch_selection" else 1

    def state_bytes_per_sequence(self) -> int:
        """Decoding's running count of each expert (int32) and whether it takes the current unit (bool)."""
        return self.num_experts * (4 + 1)

    def rate(self) -> Fraction:
        """rho = min(1, capacity_factor top_k / E), as a fraction with a small denominator (exact integer
        budgets in int32)."""
        rho = (Fraction(self.capacity_factor) * self.top_k / self.num_experts).limit_denominator(256)
        return min(Fraction(1), rho)

    def slots(self, seq_len: int) -> int:
        """C, the token slots of each expert per row of `seq_len` tokens: min(T, ceil(rho N) P)."""
        units = -(-seq_len // self.unit)
        return min(seq_len, math.ceil(self.rate() * units) * self.unit)


# ---- units ---------------------------------------------------------------------------------------

def units(positions_BxT, segment_ids_BxT, unit: int):
    """(document start, unit start: bool [B, T], unit index in the document: int32 [B, T]) of rows in
    natural order."""
    B, T = positions_BxT.shape
    positions_BxT = positions_BxT.astype(jnp.int32)
    first_T = jnp.arange(T) == 0
    restart_BxT = jnp.pad(positions_BxT[:, 1:] <= positions_BxT[:, :-1], ((0, 0), (1, 0)))
    if segment_ids_BxT is not None:
        restart_BxT = restart_BxT | jnp.pad(segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1], ((0, 0), (1, 0)))
    document_BxT = first_T | restart_BxT
    return document_BxT, document_BxT | (positions_BxT % unit == 0), positions_BxT // unit


def decoding_units(position_T, batch: int, unit: int):
    """`units` for tokens decoded at natural positions position_T (one document per row)."""
    document_BxT = jnp.broadcast_to(position_T == 0, (batch, position_T.shape[0]))
    start_BxT = document_BxT | (position_T % unit == 0)
    return document_BxT, start_BxT, jnp.broadcast_to(position_T // unit, (batch, position_T.shape[0]))


# ---- the choice ------------------------------------------------------------------------------------

class Choice(NamedTuple):
    take_BxTxE: jax.Array      # bool: the token's unit was taken by expert e (before the row buffer)
    gate_BxTxE: jax.Array      # float32: 1 + (s - stop_gradient(s)) where taken, else 0
    offer_BxTxE: jax.Array     # bool: the token's unit offered itself to expert e
    probs_BxTxE: jax.Array     # float32 router scores of every token (the units' are read at unit starts)
    count_BxE: jax.Array       # int32 units taken in the current document after the last token (decoding state)
    current_BxE: jax.Array     # bool: the last token's unit taken by e (decoding state)


def top_k_offers(probs_BxTxE, top_k: int) -> jax.Array:
    """bool [B, T, E]: e among the top_k scores of the token."""
    _, experts_BxTxK = jax.lax.top_k(jax.lax.stop_gradient(probs_BxTxE), top_k)
    return jnp.any(jax.nn.one_hot(experts_BxTxK, probs_BxTxE.shape[-1], dtype=jnp.bool_), axis=-2)


def straight_through(score):
    """Forward value exactly 1, gradient 1 to the score."""
    return 1.0 + (score - jax.lax.stop_gradient(score))


def _then(first, second):
    """Maps c -> min(c + a, b): `first`, then `second`."""
    a1, b1 = first
    a2, b2 = second
    return jnp.minimum(a1 + a2, BIG), jnp.minimum(b1 + a2, b2)


def choose(logits_BxTxE, document_BxT, start_BxT, index_BxT, *, top_k: int, rate: Fraction, count_BxE=None,
           current_BxE=None) -> Choice:
    """The causal choice of the module docstring for a run of tokens, from the state after the
    previous ones (count_BxE, current_BxE; None: a row's start)."""
    B, T, E = logits_BxTxE.shape
    probs_BxTxE = jax.nn.softmax(logits_BxTxE.astype(jnp.float32), axis=-1)
    offer_BxTxE = top_k_offers(probs_BxTxE, top_k)
    count_BxE = jnp.zeros((B, E), jnp.int32) if count_BxE is None else count_BxE
    current_BxE = jnp.zeros((B, E), bool) if current_BxE is None else current_BxE
    limit_BxTx1 = ((rate.numerator * (index_BxT + 1) + rate.denominator - 1) // rate.denominator)[..., None]
    document, start = document_BxT[..., None], start_BxT[..., None]
    wants = offer_BxTxE.astype(jnp.int32)
    # per token the map of the count: a document start forgets it, a unit start may add one, others keep it
    a_BxTxE = jnp.where(document, BIG, jnp.where(start, wants, 0))
    b_BxTxE = jnp.where(start, jnp.where(document, jnp.minimum(wants, limit_BxTx1), limit_BxTx1), BIG)
    a_BxTxE, b_BxTxE = jax.lax.associative_scan(_then, (a_BxTxE, b_BxTxE), axis=1)
    after_BxTxE = jnp.minimum(count_BxE[:, None] + a_BxTxE, b_BxTxE)
    before_BxTxE = jnp.where(document, 0, jnp.concatenate([count_BxE[:, None], after_BxTxE[:, :-1]], axis=1))
    taken_at_start = start & offer_BxTxE & (before_BxTxE < limit_BxTx1)
    # every token follows the choice made at its unit's first token (or the carried one)
    last_start_BxT = jax.lax.cummax(jnp.where(start_BxT, jnp.arange(T), -1), axis=1)
    index = jnp.maximum(last_start_BxT, 0)[..., None]
    in_run = (last_start_BxT >= 0)[..., None]
    take_BxTxE = jnp.where(in_run, jnp.take_along_axis(taken_at_start, index, axis=1), current_BxE[:, None])
    offer_BxTxE = jnp.where(in_run, jnp.take_along_axis(offer_BxTxE, index, axis=1), current_BxE[:, None])
    score_BxTxE = jnp.take_along_axis(probs_BxTxE, index, axis=1)
    gate_BxTxE = jnp.where(take_BxTxE, straight_through(score_BxTxE), 0.0)
    return Choice(take_BxTxE, gate_BxTxE, offer_BxTxE, probs_BxTxE, after_BxTxE[:, -1], take_BxTxE[:, -1])


# ---- slots ---------------------------------------------------------------------------------------

class Slots(NamedTuple):
    row_BxExC: jax.Array        # int32 token (row index) in each slot; empty slots hold 0
    valid_BxExC: jax.Array      # bool: the slot holds a token
    slot_BxTxE: jax.Array       # int32 slot of each token in expert e's buffer, C where it does not run there
    kept_BxTxE: jax.Array       # bool: taken and inside the buffer


def slots(take_BxTxE, capacity: int) -> Slots:
    """Each expert's taken tokens in order of position in its first `capacity` slots."""
    B, T, E = take_BxTxE.shape
    taken = take_BxTxE.astype(jnp.int32)
    slot_BxTxE = jnp.cumsum(taken, axis=1) - taken
    kept_BxTxE = take_BxTxE & (slot_BxTxE < capacity)
    slot_BxTxE = jnp.where(kept_BxTxE, slot_BxTxE, capacity)
    b, t = jnp.arange(B)[:, None, None], jnp.arange(T)[None, :, None]
    rows = jnp.zeros((B, E, capacity + 1), jnp.int32).at[b, jnp.arange(E), slot_BxTxE].set(
        jnp.broadcast_to(t, (B, T, E)))
    valid_BxExC = jnp.arange(capacity) < jnp.sum(kept_BxTxE, axis=1)[..., None]
    return Slots(rows[:, :, :capacity], valid_BxExC, slot_BxTxE, kept_BxTxE)


def gather_rows(x_BxTx___, row_BxExC):
    """x at each slot's row: [B, E, C, ...]."""
    B, E, C = row_BxExC.shape
    index = row_BxExC.reshape(B, E * C).reshape((B, E * C) + (1,) * (x_BxTx___.ndim - 2))
    return jnp.take_along_axis(x_BxTx___, index, axis=1).reshape((B, E, C) + x_BxTx___.shape[2:])


def combine(out_BxExCxD, s: Slots, gate_BxTxE) -> jax.Array:
    """float32 [B, T, D]: sum over the experts a token ran on of gate * the expert's output in its slot."""
    padded = jnp.pad(out_BxExCxD.astype(jnp.float32), ((0, 0), (0, 0), (0, 1), (0, 0)))   # slot C: zeros
    picked_BxExTxD = jnp.take_along_axis(padded, jnp.swapaxes(s.slot_BxTxE, 1, 2)[..., None], axis=2)
    gate_BxTxE = jnp.where(s.kept_BxTxE, gate_BxTxE, 0.0)
    return jnp.einsum("bte,betd->btd", gate_BxTxE, picked_BxExTxD)


# ---- balance ---------------------------------------------------------------------------------------

def report(module, choice: Choice, start_BxT, kept_BxTxE, balance_loss_weight: float) -> None:
    """The balance loss and metrics of the module docstring, through layers/auxiliary."""
    E = choice.probs_BxTxE.shape[-1]
    unit_BxTx1 = start_BxT[..., None].astype(jnp.float32)
    if balance_loss_weight:
        offers_E = jnp.sum(choice.offer_BxTxE * unit_BxTx1, axis=(0, 1))
        mean_probs_E = jnp.sum(choice.probs_BxTxE * unit_BxTx1, axis=(0, 1)) / jnp.maximum(jnp.sum(unit_BxTx1), 1.0)
        report_loss(module, "balance_loss", balance_loss_weight * balancing.switch_loss(offers_E, mean_probs_E))
    ran_E = jnp.sum(kept_BxTxE.astype(jnp.float32), axis=(0, 1)).reshape(E)
    report_metric(module, "load", ran_E / jnp.maximum(jnp.sum(ran_E), 1.0))
    report_metric(module, "imbalance", balancing.imbalance(ran_E))
    report_metric(module, "dropped_fraction", 1.0 - jnp.sum(ran_E) / jnp.maximum(jnp.sum(choice.offer_BxTxE), 1.0))
