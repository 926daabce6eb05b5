"""Fit scaling laws to a sweep's results.jsonl, per architecture, and draw the plots.

    hybrax-fit fit <sweep_dir> [--params-key params] [--bootstrap 200]

Prints per `arch` the parametric law (Chinchilla approach 3) with bootstrap intervals, the
compute-optimal exponents it implies, and the IsoFLOP exponents (approach 2) when the sweep has
2+ compute budgets with 3+ sizes around each minimum; writes <sweep_dir>/plots/*.png.
"""

import argparse
import pathlib
import sys

import numpy as np

from hybrax.experiments.scaling.bootstrap import fit_parametric_bootstrap
from hybrax.experiments.scaling.isoflop import fit_isoflop
from hybrax.experiments.scaling.parametric import CONSTANTS, MIN_RECORDS, compute_optimal, fit_parametric
from hybrax.experiments.scaling.plots import plot_fit_vs_observed, plot_isoflop, plot_loss_vs_compute
from hybrax.experiments.scaling.records import PARAMS_KEYS, column, group_by, load_records, param_counts, split_finite_loss


def _span(values: np.ndarray) -> str:
    return f"{values.min():.3g}..{values.max():.3g}"


def _parametric(records: list[dict], args) -> dict | None:
    try:
        if args.bootstrap > 0:
            fit = fit_parametric_bootstrap(records, n=args.bootstrap, seed=args.seed, params_key=args.params_key,
                                           num_starts=args.num_starts)
        else:
            fit = fit_parametric(records, params_key=args.params_key, num_starts=args.num_starts)
    except ValueError as error:
        print(f"  parametric fit: skipped: {error}")
        return None
    if len(records) < 2 * MIN_RECORDS:
        print(f"  warning: {len(records)} runs for {MIN_RECORDS} constants: the constants are weakly "
              "determined" + ("; read the intervals" if args.bootstrap else "; use --bootstrap for intervals"))
    interval = fit.get("interval")
    header = f"  {'constant':<9}{'value':>12}" + (f"   {interval[0]:g}-{interval[1]:g}% interval" if interval else "")
    print(header)
    for name in CONSTANTS:
        row = f"  {name:<9}{fit[name]:>12.4g}"
        if interval:
            low, high = fit["intervals"][name]
            row += f"   [{low:.4g}, {high:.4g}]"
        print(row)
    print(f"  mean Huber loss {fit['loss']:.3g}")
    alpha, beta = fit["alpha"], fit["beta"]
    if alpha > 0 and beta > 0:
        c = float(column(records, "flops").max())
        n_opt, d_opt = compute_optimal(fit, c, k=args.k)
        print(f"  compute-optimal (C = {args.k:g} N D): N_opt ~ C^{beta / (alpha + beta):.3f}, "
              f"D_opt ~ C^{alpha / (alpha + beta):.3f}; at C={c:.3g}: N_opt={n_opt:.3g}, D_opt={d_opt:.3g}")
    return fit


def _isoflop(records: list[dict], args):
    try:
        fit = fit_isoflop(records, params_key=args.params_key, budget_key=args.budget_key,
                          tolerance=args.budget_tolerance)
    except ValueError as error:
        print(f"  IsoFLOP: not enough data: {error}")
        return None
    print(f"  IsoFLOP ({len(fit.budgets)} budgets): N_opt = {fit.n_coefficient:.3g} C^{fit.n_exponent:.3f}, "
          f"D_opt = {fit.d_coefficient:.3g} C^{fit.d_exponent:.3f}")
    for line in fit.skipped:
        print(f"    budget left out: {line}")
    return fit


def fit_command(args) -> int:
    sweep_dir = pathlib.Path(args.sweep_dir)
    records, dropped = split_finite_loss(load_records(sweep_dir))
    if dropped:
        print(f"dropped {len(dropped)} runs without a finite val_loss: "
              + ", ".join(str(r.get("name", "?")) for r in dropped))
    if not records:
        raise ValueError(f"no runs with a finite val_loss in {sweep_dir}")
    groups = group_by(records, "arch")
    fits, isoflop_fits = {}, {}
    for arch, group in groups.items():
        n = param_counts(group, args.params_key)
        print(f"\n== {arch}: {len(group)} runs, N ({args.params_key}) {_span(n)}, "
              f"D {_span(column(group, 'tokens'))}, C {_span(column(group, 'flops'))}")
        fits[arch] = _parametric(group, args)
        isoflop_fits[arch] = _isoflop(group, args)
    plots = sweep_dir / "plots"
    written = [
        plot_loss_vs_compute(groups, plots / "loss_vs_compute.png"),
        plot_isoflop(groups, isoflop_fits, plots / "isoflop.png", params_key=args.params_key,
                     budget_key=args.budget_key, tolerance=args.budget_tolerance),
        plot_fit_vs_observed(groups, fits, plots / "fit_vs_observed.png", params_key=args.params_key),
    ]
    print("\nplots: " + ", ".join(str(path) for path in written))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hybrax-fit", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fit = commands.add_parser("fit", help="fit the laws of <sweep_dir>/results.jsonl and plot them")
    fit.add_argument("sweep_dir")
    fit.add_argument("--params-key", default="params", choices=PARAMS_KEYS,
                     help="N of the law; 'average' is sqrt(params * active_params)")
    fit.add_argument("--bootstrap", type=int, default=0, metavar="N", help="resamples for the intervals")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--num-starts", type=int, default=16, help="L-BFGS starts (best points of the grid)")
    fit.add_argument("--k", type=float, default=6.0, help="C = k N D for the compute-optimal allocation")
    fit.add_argument("--budget-key", default=None,
                     help="record key or override naming the compute budget (default: budget_flops where every "
                          "run has one, i.e. a sweep.flops sweep; else group by flops)")
    fit.add_argument("--budget-tolerance", type=float, default=0.05,
                     help="without --budget-key: runs within this many decades of flops share a budget")
    args = parser.parse_args(argv)
    try:
        return fit_command(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
