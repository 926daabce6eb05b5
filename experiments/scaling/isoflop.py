"""IsoFLOP analysis, Chinchilla approach 2 (Hoffmann et al. 2022, section 3.2).

Runs that share a compute budget C form an IsoFLOP profile. Per budget, a parabola of the final
loss in log N gives N_opt(C) at its vertex, and one in log D gives D_opt(C). Over budgets,
least squares in log space fits N_opt = a C**b and D_opt = a' C**b'; under C = k N D, b + b' = 1.

A budget's runs are those whose `budget_key` (a record key or "key=value" override) is equal, or,
without a key, those with the same `budget_flops` (the `sweep.flops` a sweep run was given) when
every record has one, and otherwise those whose log10(flops) lie within `tolerance` of the
smallest in the group.
"""

import dataclasses
from collections.abc import Sequence

import numpy as np

from hybrax.experiments.scaling.records import column, group_by, param_counts


class InsufficientDataError(ValueError):
    """The records do not allow the analysis (too few budgets, or points per budget)."""


@dataclasses.dataclass
class BudgetFit:
    """One IsoFLOP profile: its points, the two parabolas (numpy.polyfit order) and the minimum."""

    flops: float  # geometric mean of the profile's flops
    params: np.ndarray
    tokens: np.ndarray
    losses: np.ndarray
    params_parabola: np.ndarray  # loss = c2 log(N)**2 + c1 log(N) + c0
    tokens_parabola: np.ndarray  # loss = c2 log(D)**2 + c1 log(D) + c0
    n_opt: float
    d_opt: float
    loss_opt: float  # the N-parabola's value at its vertex


@dataclasses.dataclass
class IsoFLOPFit:
    """N_opt = n_coefficient * C**n_exponent, D_opt = d_coefficient * C**d_exponent."""

    budgets: list[BudgetFit]
    n_exponent: float
    n_coefficient: float
    d_exponent: float
    d_coefficient: float
    skipped: list[str]  # one line per profile left out, saying why


def group_budgets(records: Sequence[dict], *, budget_key: str | None = None,
                  tolerance: float = 0.05) -> list[list[dict]]:
    """Records grouped into compute budgets, in increasing flops (see the module docstring)."""
    if budget_key is None and records and all(record.get("budget_flops") for record in records):
        budget_key = "budget_flops"
    if budget_key is not None:
        groups = list(group_by(records, budget_key).values())
        return sorted(groups, key=lambda group: float(np.mean(np.log(column(group, "flops")))))
    log_flops = np.log10(column(records, "flops"))
    groups: list[list[dict]] = []
    start = -np.inf
    for index in np.argsort(log_flops, kind="stable"):
        if log_flops[index] - start > tolerance:
            groups.append([])
            start = log_flops[index]
        groups[-1].append(records[index])
    return groups


def _vertex(log_x: np.ndarray, losses: np.ndarray) -> tuple[np.ndarray, float | None, str]:
    """(parabola, vertex log x or None, why not)."""
    parabola = np.polyfit(log_x, losses, 2)
    if parabola[0] <= 0:
        return parabola, None, "the parabola has no minimum (curvature <= 0)"
    vertex = -parabola[1] / (2 * parabola[0])
    if not log_x.min() <= vertex <= log_x.max():
        return parabola, None, "the parabola's minimum lies outside the sampled range"
    return parabola, vertex, ""


def fit_budget(records: Sequence[dict], *, params_key: str = "params") -> tuple[BudgetFit | None, str]:
    """(BudgetFit, "") for one IsoFLOP profile, or (None, why it has no usable minimum)."""
    n, d = param_counts(records, params_key), column(records, "tokens")
    losses, flops = column(records, "val_loss"), column(records, "flops")
    if len(np.unique(n)) < 3 or len(np.unique(d)) < 3:
        return None, f"{len(np.unique(n))} model sizes; a parabola needs 3"
    n_parabola, log_n_opt, why = _vertex(np.log(n), losses)
    if log_n_opt is None:
        return None, f"loss vs log N: {why}"
    d_parabola, log_d_opt, why = _vertex(np.log(d), losses)
    if log_d_opt is None:
        return None, f"loss vs log D: {why}"
    return BudgetFit(float(np.exp(np.log(flops).mean())), n, d, losses, n_parabola, d_parabola,
                     float(np.exp(log_n_opt)), float(np.exp(log_d_opt)),
                     float(np.polyval(n_parabola, log_n_opt))), ""


def fit_isoflop(records: Sequence[dict], *, params_key: str = "params", budget_key: str | None = None,
                tolerance: float = 0.05) -> IsoFLOPFit:
    """IsoFLOP fit of `records`; InsufficientDataError (one line) when fewer than 2 budgets have a
    minimum. A budget counts if it has 3 or more sizes and both parabolas have their minimum inside
    the sampled range."""
    records = list(records)
    if not records:
        raise InsufficientDataError("no records")
    budgets, skipped = [], []
    groups = group_budgets(records, budget_key=budget_key, tolerance=tolerance)
    for group in groups:
        budget, why = fit_budget(group, params_key=params_key)
        if budget is None:
            skipped.append(f"C={np.exp(np.log(column(group, 'flops')).mean()):.3g}: {why}")
        else:
            budgets.append(budget)
    if len(budgets) < 2:
        sizes = max(len(np.unique(param_counts(group, params_key))) for group in groups)
        raise InsufficientDataError(
            f"{len(budgets)} of {len(groups)} compute budgets have a loss minimum (most sizes in one budget: "
            f"{sizes}); the IsoFLOP fit needs 2 budgets with 3+ sizes around their minimum")
    log_c = np.log([b.flops for b in budgets])
    n_exponent, n_log_coefficient = np.polyfit(log_c, np.log([b.n_opt for b in budgets]), 1)
    d_exponent, d_log_coefficient = np.polyfit(log_c, np.log([b.d_opt for b in budgets]), 1)
    return IsoFLOPFit(budgets, float(n_exponent), float(np.exp(n_log_coefficient)),
                      float(d_exponent), float(np.exp(d_log_coefficient)), skipped)
