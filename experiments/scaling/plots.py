"""The three sweep plots, PNGs drawn with matplotlib's Agg backend (no display needed).

- `loss_vs_compute.png`: val_loss vs training FLOPs per architecture, log x, and each one's compute
  frontier: the lower envelope, the runs with lower loss than every cheaper run.
- `isoflop.png`: one panel per architecture, loss vs N per compute budget and its parabola in log N.
- `fit_vs_observed.png`: the parametric law's prediction vs the observed loss, and y = x.
"""

import pathlib
from collections.abc import Mapping, Sequence

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402

from hybrax.experiments.scaling.isoflop import IsoFLOPFit, group_budgets  # noqa: E402
from hybrax.experiments.scaling.parametric import predict_loss  # noqa: E402
from hybrax.experiments.scaling.records import column, param_counts  # noqa: E402


def compute_frontier(flops: np.ndarray, losses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The runs with lower loss than every run of fewer (or equal) FLOPs, in increasing FLOPs."""
    order = np.lexsort((losses, flops))
    keep, best = [], np.inf
    for index in order:
        if losses[index] < best:
            keep.append(index)
            best = losses[index]
    return flops[keep], losses[keep]


def _save(figure, path: pathlib.Path) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_loss_vs_compute(groups: Mapping[str, Sequence[dict]], path: pathlib.Path) -> pathlib.Path:
    figure, axes = plt.subplots(figsize=(7, 5))
    for color, (arch, records) in zip(plt.cm.tab10.colors, groups.items()):
        flops, losses = column(records, "flops"), column(records, "val_loss")
        axes.scatter(flops, losses, color=color, s=18, alpha=0.7, label=arch)
        axes.step(*compute_frontier(flops, losses), where="post", color=color, lw=1.5)
    axes.set(xscale="log", xlabel="training FLOPs", ylabel="val loss (nats/token)",
             title="loss vs compute (lines: compute frontier)")
    axes.legend()
    return _save(figure, path)


def _short_exponent(value: float, _position=None) -> str:
    """2e4 for 20000 (tick labels)."""
    mantissa, exponent = f"{value:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def plot_isoflop(groups: Mapping[str, Sequence[dict]], isoflop_fits: Mapping[str, IsoFLOPFit | None],
                 path: pathlib.Path, *, params_key: str = "params", budget_key: str | None = None,
                 tolerance: float = 0.05) -> pathlib.Path:
    figure, panels = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4.5), squeeze=False)
    for axes, (arch, records) in zip(panels[0], groups.items()):
        fit = isoflop_fits.get(arch)
        parabolas = {round(np.log10(b.flops), 6): b for b in fit.budgets} if fit else {}
        budgets = group_budgets(records, budget_key=budget_key, tolerance=tolerance)
        colors = plt.cm.viridis(np.linspace(0, 0.9, len(budgets)))
        for color, budget in zip(colors, budgets):
            flops = float(np.exp(np.log(column(budget, "flops")).mean()))
            n, losses = param_counts(budget, params_key), column(budget, "val_loss")
            axes.scatter(n, losses, color=color, s=18, label=f"C={flops:.2g}")
            fitted = parabolas.get(round(np.log10(flops), 6))
            if fitted is not None:
                log_n = np.linspace(np.log(n.min()), np.log(n.max()), 100)
                axes.plot(np.exp(log_n), np.polyval(fitted.params_parabola, log_n), color=color, lw=1)
                axes.plot(fitted.n_opt, fitted.loss_opt, "x", color=color, ms=8)
        title = arch if fit else f"{arch} (no IsoFLOP fit)"
        axes.set(xscale="log", xlabel=f"N ({params_key})", ylabel="val loss (nats/token)", title=title)
        # ticks at 1, 2 and 5 per decade: matplotlib's own minor labels collide over one or two decades
        axes.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        axes.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(_short_exponent))
        axes.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axes.legend(fontsize=7)
    return _save(figure, path)


def plot_fit_vs_observed(groups: Mapping[str, Sequence[dict]], fits: Mapping[str, dict | None],
                         path: pathlib.Path, *, params_key: str = "params") -> pathlib.Path:
    figure, axes = plt.subplots(figsize=(5.5, 5.5))
    for color, (arch, records) in zip(plt.cm.tab10.colors, groups.items()):
        fit = fits.get(arch)
        if fit is None:
            continue
        observed = column(records, "val_loss")
        predicted = predict_loss(fit, param_counts(records, params_key), column(records, "tokens"))
        axes.scatter(observed, predicted, color=color, s=18, alpha=0.7, label=arch)
    low, high = axes.get_xlim() if axes.has_data() else (0.0, 1.0)
    axes.plot([low, high], [low, high], "k--", lw=1, label="y = x")
    axes.set(xlabel="observed val loss", ylabel="predicted val loss", title="parametric fit vs observed")
    axes.legend()
    return _save(figure, path)
