"""Parametric scaling law L(N, D) = E + A / N**alpha + B / D**beta, fit by Chinchilla approach 3.

Hoffmann et al. 2022 ("Training Compute-Optimal Large Language Models", section 3.3 and D.2):
with A = exp(a), B = exp(b), E = exp(e), minimise over (a, b, e, alpha, beta)

    sum_i Huber_delta( LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i ),   delta = 1e-3

by L-BFGS from a grid of initialisations and keep the best. The objective here is the mean of
Huber / delta (same minimiser; its gradient is O(residual), so L-BFGS's tolerances mean something).
The full grid is scored in one vectorised pass and L-BFGS runs from the `num_starts` best points.

Compute-optimal allocation under C = k N D (k = 6 by convention): minimising
A N**-alpha + B (C / (k N))**-beta over N gives

    N_opt = G (C / k)**(beta / (alpha + beta)),  D_opt = (C / k) / N_opt = (C / k)**(alpha / (alpha + beta)) / G,
    G = (alpha A / (beta B))**(1 / (alpha + beta)).
"""

import itertools
from collections.abc import Sequence

import numpy as np
import scipy.optimize
import scipy.special

from hybrax.experiments.scaling.records import law_arrays

CONSTANTS = ("E", "A", "B", "alpha", "beta")
# Chinchilla's grid (alpha, beta in 0..2 by 0.5, e in -1..1 by 0.5, a, b in 0..25 by 5), with
# alpha = beta = 0 (a flat law, zero gradient in a and b) moved to 0.1.
DEFAULT_INIT_GRID = {
    "alpha": (0.1, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.1, 0.5, 1.0, 1.5, 2.0),
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
}
MIN_RECORDS = 5  # five constants


def _residuals_and_weights(theta_SxP, log_n, log_d, log_l):
    """Log-space residuals (S, R) and the softmax weights (S, R, 3) of the three LSE terms."""
    a, b, e, alpha, beta = (theta_SxP[:, i, None] for i in range(5))
    terms_SxRx3 = np.stack([a - alpha * log_n, b - beta * log_d, np.broadcast_to(e, (len(a), len(log_n)))], -1)
    max_SxR = terms_SxRx3.max(-1)
    exp_SxRx3 = np.exp(terms_SxRx3 - max_SxR[..., None])
    total_SxR = exp_SxRx3.sum(-1)
    return max_SxR + np.log(total_SxR) - log_l, exp_SxRx3 / total_SxR[..., None]


def _objective(theta, log_n, log_d, log_l, delta):
    """Mean Huber_delta(r) / delta and its gradient in (a, b, e, alpha, beta)."""
    r_SxR, w_SxRx3 = _residuals_and_weights(theta[None], log_n, log_d, log_l)
    r, w = r_SxR[0], w_SxRx3[0]
    loss = scipy.special.huber(delta, r).mean() / delta
    dloss_dr = np.clip(r, -delta, delta) / delta / len(r)
    grad = np.array([w[:, 0], w[:, 1], w[:, 2], -w[:, 0] * log_n, -w[:, 1] * log_d]) @ dloss_dr
    return loss, grad


def _grid_points(init_grid: dict) -> np.ndarray:
    return np.array(list(itertools.product(*(init_grid[k] for k in ("a", "b", "e", "alpha", "beta")))), float)


def fit_arrays(n, d, loss, *, delta=1e-3, init_grid=None, num_starts=16, extra_starts=()) -> dict:
    """`fit_parametric` on float arrays N, D, L (no checks); `extra_starts` are (a, b, e, alpha, beta)."""
    log_n, log_d, log_l = np.log(n), np.log(d), np.log(loss)
    grid = _grid_points(DEFAULT_INIT_GRID if init_grid is None else init_grid)
    r_SxR, _ = _residuals_and_weights(grid, log_n, log_d, log_l)
    scores = scipy.special.huber(delta, r_SxR).mean(-1)
    starts = list(grid[np.argsort(scores)[:num_starts]]) + [np.asarray(s, float) for s in extra_starts]
    best = None
    for start in starts:
        result = scipy.optimize.minimize(
            _objective, start, args=(log_n, log_d, log_l, delta), jac=True, method="L-BFGS-B",
            options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-10})
        if np.all(np.isfinite(result.x)) and (best is None or result.fun < best.fun):
            best = result
    if best is None:
        raise ValueError(f"L-BFGS found no finite fit from {len(starts)} starts")
    a, b, e, alpha, beta = best.x
    return {"E": float(np.exp(e)), "A": float(np.exp(a)), "B": float(np.exp(b)),
            "alpha": float(alpha), "beta": float(beta), "loss": float(best.fun * delta),
            "num_records": len(n), "theta": best.x.tolist()}


def fit_parametric(records: Sequence[dict], *, params_key: str = "params", delta: float = 1e-3,
                   init_grid: dict | None = None, num_starts: int = 16) -> dict:
    """Fit L(N, D) = E + A / N**alpha + B / D**beta to `records` (Chinchilla approach 3).

    N is `records[i][params_key]` (see `records.param_counts`), D is `tokens`, L is `val_loss`.
    `init_grid` maps "a", "b", "e", "alpha", "beta" to the values tried (default
    `DEFAULT_INIT_GRID`, 3750 points); L-BFGS runs from the `num_starts` best of them.

    Returns {"E", "A", "B", "alpha", "beta"} plus "loss" (the minimised mean Huber of the log
    residuals), "num_records" and "theta" (the raw (a, b, e, alpha, beta)). With about as many
    records as constants (5) the fit runs but the constants are weakly determined.
    """
    n, d, loss = law_arrays(records, params_key, min_records=MIN_RECORDS)
    if num_starts < 1:
        raise ValueError(f"num_starts={num_starts} must be at least 1")
    return fit_arrays(n, d, loss, delta=delta, init_grid=init_grid, num_starts=num_starts)


def predict_loss(fit: dict, n, d) -> np.ndarray:
    """E + A / N**alpha + B / D**beta for the fitted constants, broadcast over N and D."""
    n, d = np.asarray(n, float), np.asarray(d, float)
    return fit["E"] + fit["A"] / n ** fit["alpha"] + fit["B"] / d ** fit["beta"]


def compute_optimal(fit: dict, flops, *, k: float = 6.0) -> tuple[np.ndarray, np.ndarray]:
    """(N_opt, D_opt) minimising the fitted L under flops = k N D (closed form, module docstring)."""
    alpha, beta = fit["alpha"], fit["beta"]
    if alpha <= 0 or beta <= 0:
        raise ValueError(f"compute-optimal allocation needs alpha, beta > 0, got alpha={alpha:.3g}, beta={beta:.3g}")
    nd = np.asarray(flops, float) / k
    g = (alpha * fit["A"] / (beta * fit["B"])) ** (1 / (alpha + beta))
    n_opt = g * nd ** (beta / (alpha + beta))
    return n_opt, nd / n_opt
