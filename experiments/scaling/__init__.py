"""Scaling-law analysis of sweep results: parametric fits (Chinchilla approach 3), IsoFLOP
profiles (approach 2), bootstrap intervals, compute-optimal allocation, plots.

    hybrax-fit fit <sweep_dir> [--params-key ...] [--bootstrap N]
"""

from hybrax.experiments.scaling.bootstrap import fit_parametric_bootstrap
from hybrax.experiments.scaling.isoflop import BudgetFit, InsufficientDataError, IsoFLOPFit, fit_isoflop, group_budgets
from hybrax.experiments.scaling.parametric import CONSTANTS, compute_optimal, fit_parametric, predict_loss
from hybrax.experiments.scaling.plots import compute_frontier, plot_fit_vs_observed, plot_isoflop, plot_loss_vs_compute
from hybrax.experiments.scaling.records import PARAMS_KEYS, group_by, load_records, param_counts

__all__ = [
    "BudgetFit", "CONSTANTS", "InsufficientDataError", "IsoFLOPFit", "PARAMS_KEYS", "compute_frontier",
    "compute_optimal", "fit_isoflop", "fit_parametric", "fit_parametric_bootstrap", "group_budgets", "group_by",
    "load_records", "param_counts", "plot_fit_vs_observed", "plot_isoflop", "plot_loss_vs_compute",
    "predict_loss",
]
