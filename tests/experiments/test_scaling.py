"""hybrax.experiments.scaling against synthetic sweeps drawn from a known law L = E + A/N^alpha + B/D^beta."""

import json

import numpy as np
import pytest
import scipy.optimize

from hybrax.experiments.scaling import (compute_frontier, compute_optimal, fit_isoflop, fit_parametric,
                                 fit_parametric_bootstrap, group_budgets, param_counts, predict_loss)
from hybrax.experiments.scaling.__main__ import main

CHINCHILLA = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)  # Hoffmann et al. 2022
EPOCH = dict(E=1.82, A=482.0, B=2085.4, alpha=0.35, beta=0.37)  # Besiroglu et al. 2024 replication
K = 6.0


def make_records(truth, n, d, *, noise, seed, arch="attention", flops=None):
    """Records of a sweep over (n, d) with losses truth * exp(noise * standard normal)."""
    rng = np.random.default_rng(seed)
    n, d = np.asarray(n, float).ravel(), np.asarray(d, float).ravel()
    losses = predict_loss(truth, n, d) * np.exp(noise * rng.standard_normal(n.size))
    flops = K * n * d if flops is None else np.asarray(flops, float).ravel()
    return [dict(name=f"{arch}_{i}", arch=arch, overrides=[f"model.size={ni:.3g}"], params=ni,
                 non_embedding_params=0.9 * ni, active_params=ni, tokens=di, flops=ci, val_loss=li,
                 val_bpb=li / np.log(2) / 4, wall_s=1.0)
            for i, (ni, di, ci, li) in enumerate(zip(n, d, flops, losses))]


def grid_records(truth, *, noise, seed, sizes=8, n_range=(6, 10), d_range=(7, 12), arch="attention"):
    n, d = np.meshgrid(np.logspace(*n_range, sizes), np.logspace(*d_range, sizes))
    return make_records(truth, n, d, noise=noise, seed=seed, arch=arch)


def isoflop_records(truth, budgets, *, noise, seed, arch="attention", sizes=9):
    """Per budget C, `sizes` models over 2 decades around the law's N_opt(C), off-centre by up to
    0.3 decades (differently per budget, as a real sweep's guess would be), D = C / (6 N)."""
    n, c = [], []
    for i, budget in enumerate(budgets):
        n_opt, _ = compute_optimal(truth, budget, k=K)
        n.append(n_opt * np.logspace(-1, 1, sizes) * 10 ** (0.3 * np.sin(1.7 * i)))
        c.append(np.full(sizes, budget))
    n, c = np.concatenate(n), np.concatenate(c)
    return make_records(truth, n, c / (K * n), noise=noise, seed=seed, arch=arch)


# Noise 0.5% on a 1e6..1e10 x 1e7..1e12 grid: over 20 seeds the E error is 0.6% rms, 1.3% at worst
# (alpha, beta: 0.002 rms). At 1% noise on 1e6..1e9 x 1e7..1e11 (7 x 7) E is off by 2.5% rms, up
# to 7%: with every loss far above E, E trades off against A and alpha.
@pytest.mark.parametrize("truth", [CHINCHILLA, EPOCH], ids=["chinchilla", "epoch"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_parametric_recovers_known_law(truth, seed):
    fit = fit_parametric(grid_records(truth, noise=0.005, seed=seed), num_starts=2)
    assert abs(fit["E"] / truth["E"] - 1) < 0.02
    assert abs(fit["alpha"] - truth["alpha"]) < 0.03
    assert abs(fit["beta"] - truth["beta"]) < 0.03
    assert fit["num_records"] == 64


def test_fit_parametric_exact_data_is_exact():
    fit = fit_parametric(grid_records(CHINCHILLA, noise=0.0, seed=0, sizes=5), num_starts=2)
    for name, value in CHINCHILLA.items():
        assert fit[name] == pytest.approx(value, rel=1e-3), name


def test_params_key_average_is_geometric_mean_of_total_and_active():
    records = grid_records(CHINCHILLA, noise=0.0, seed=0, sizes=3)
    for record in records:
        record["active_params"] = record["params"] / 4
    assert param_counts(records, "average") == pytest.approx(param_counts(records, "params") / 2)


def test_fit_parametric_params_key_rescales_a():
    # the law holds in params = N; in N' = 0.9 N (non_embedding_params) A / N**alpha = A 0.9**alpha / N'**alpha
    records = grid_records(CHINCHILLA, noise=0.0, seed=0, sizes=5)
    fit = fit_parametric(records, params_key="non_embedding_params", num_starts=2)
    assert fit["alpha"] == pytest.approx(CHINCHILLA["alpha"], rel=1e-3)
    assert fit["A"] == pytest.approx(CHINCHILLA["A"] * 0.9 ** CHINCHILLA["alpha"], rel=1e-3)


@pytest.mark.parametrize("truth", [CHINCHILLA, EPOCH], ids=["chinchilla", "epoch"])
def test_isoflop_recovers_exponents(truth):
    records = isoflop_records(truth, np.logspace(18, 22, 5), noise=0.002, seed=0)
    fit = fit_isoflop(records)
    alpha, beta = truth["alpha"], truth["beta"]
    assert len(fit.budgets) == 5 and not fit.skipped
    assert fit.n_exponent == pytest.approx(beta / (alpha + beta), abs=0.02)
    assert fit.d_exponent == pytest.approx(alpha / (alpha + beta), abs=0.02)
    assert fit.n_exponent + fit.d_exponent == pytest.approx(1.0, abs=1e-3)  # C = 6 N D exactly


def test_isoflop_groups_by_flops_tolerance_and_by_key():
    records = isoflop_records(CHINCHILLA, [1e18, 1e19], noise=0.0, seed=0, sizes=4)
    for i, record in enumerate(records):
        record["flops"] *= 1.05 if i % 2 else 0.97  # measured FLOPs scatter around the nominal budget
        record["overrides"].append(f"budget={record['tokens'] * record['params'] * K:.0e}")
    assert [len(g) for g in group_budgets(records)] == [4, 4]
    assert [len(g) for g in group_budgets(records, budget_key="budget")] == [4, 4]
    assert [len(g) for g in group_budgets(records, tolerance=0.01)] == [2, 2, 2, 2]


def test_isoflop_groups_sweep_budgets_by_budget_flops():
    # a sweep.flops sweep records each run's budget: whole steps put its flops within a step of it
    records = isoflop_records(CHINCHILLA, [1e18, 1e19], noise=0.0, seed=0, sizes=4)
    for i, record in enumerate(records):
        record["budget_flops"] = 1e18 if i < 4 else 1e19
        record["flops"] *= 1.2 if i % 2 else 0.9
    assert [len(g) for g in group_budgets(records, tolerance=0.01)] == [4, 4]
    del records[0]["budget_flops"]   # not every record has one: grouped by flops
    assert [len(g) for g in group_budgets(records, tolerance=0.01)] == [2, 2, 2, 2]


def test_isoflop_too_few_budgets_is_one_line_error():
    tiny = make_records(CHINCHILLA, np.repeat([1e7, 3e7, 1e8], 2), np.tile([1e9, 4e9], 3), noise=0.0, seed=0)
    with pytest.raises(ValueError, match="IsoFLOP fit needs 2 budgets") as error:
        fit_isoflop(tiny)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("truth", [CHINCHILLA, EPOCH], ids=["chinchilla", "epoch"])
@pytest.mark.parametrize("k", [6.0, 8.0])
def test_compute_optimal_matches_numeric_minimisation(truth, k):
    budgets = np.logspace(17, 25, 5)
    n_opt, d_opt = compute_optimal(truth, budgets, k=k)
    np.testing.assert_allclose(k * n_opt * d_opt, budgets, rtol=1e-12)
    for budget, n_closed in zip(budgets, n_opt):
        result = scipy.optimize.minimize_scalar(
            lambda log_n: predict_loss(truth, np.exp(log_n), budget / (k * np.exp(log_n))),
            bracket=(np.log(1e3), np.log(1e15)), tol=1e-12)
        assert np.exp(result.x) == pytest.approx(n_closed, rel=1e-4)


# Over 20 synthetic sweeps like this one (n=30 resamples), each 5-95% interval held the true
# constant in 19 of 20, all five at once in 17 of 20. Sweep seed 0 is one of the misses: B in
# [412, 515] against 410.7 (its point estimate 463 is high), so this test draws seed 1.
def test_bootstrap_intervals_contain_truth_and_are_reproducible():
    records = grid_records(CHINCHILLA, noise=0.01, seed=1, sizes=5)
    options = dict(n=16, seed=0, num_starts=2, resample_starts=1)
    first = fit_parametric_bootstrap(records, **options)
    for name, value in CHINCHILLA.items():
        low, high = first["intervals"][name]
        assert low < value < high, (name, low, value, high)
        assert low <= first[name] <= high
    again = fit_parametric_bootstrap(records, **options)
    assert again["intervals"] == first["intervals"]
    other = fit_parametric_bootstrap(records, **{**options, "seed": 1})
    assert other["intervals"] != first["intervals"]


@pytest.mark.parametrize("change, message", [
    (lambda rs: rs[:4], "4 records; the fit needs at least 5"),
    (lambda rs: [{**rs[0], "tokens": 0}] + rs[1:], "tokens=0.0 must be finite and positive"),
    (lambda rs: [{**rs[0], "val_loss": float("nan")}] + rs[1:], "val_loss=nan must be finite and positive"),
    (lambda rs: [{k: v for k, v in rs[0].items() if k != "params"}] + rs[1:], "has no key 'params'"),
    (lambda rs: [{**rs[0], "params": "big"}] + rs[1:], "params='big' is not a number"),
])
def test_fit_parametric_bad_input_is_one_line_error(change, message):
    records = grid_records(CHINCHILLA, noise=0.0, seed=0, sizes=3)
    with pytest.raises(ValueError, match=message) as error:
        fit_parametric(change(records))
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="params_key='total'; valid: params, non_embedding_params"):
        fit_parametric(records, params_key="total")


def test_compute_frontier_is_lower_envelope():
    flops = np.array([1.0, 2.0, 2.0, 3.0, 4.0, 5.0])
    losses = np.array([5.0, 4.0, 4.5, 4.2, 3.0, 3.5])
    frontier_flops, frontier_losses = compute_frontier(flops, losses)
    np.testing.assert_array_equal(frontier_flops, [1.0, 2.0, 4.0])
    np.testing.assert_array_equal(frontier_losses, [5.0, 4.0, 3.0])


def test_cli_fit_prints_tables_and_writes_plots(tmp_path, capsys):
    rich = isoflop_records(CHINCHILLA, [1e17, 1e18, 1e19], noise=0.002, seed=0, arch="attention", sizes=5)
    tiny = make_records(EPOCH, np.repeat([1e7, 3e7, 1e8], 2), np.tile([1e9, 4e9], 3), noise=0.005, seed=1,
                        arch="hybrid_gla")
    diverged = {**tiny[0], "name": "diverged", "val_loss": float("nan")}
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rich + tiny + [diverged]))
    assert main(["fit", str(tmp_path), "--bootstrap", "4", "--num-starts", "2"]) == 0
    out = capsys.readouterr().out
    assert "dropped 1 runs without a finite val_loss: diverged" in out
    assert "== attention: 15 runs" in out and "== hybrid_gla: 6 runs" in out
    assert "IsoFLOP (3 budgets): N_opt = " in out
    assert "IsoFLOP: not enough data: " in out  # hybrid_gla: 3 sizes x 2 token budgets
    assert "warning: 6 runs for 5 constants" in out
    for name in ("E", "A", "B", "alpha", "beta"):
        assert out.count(f"\n  {name} ") == 2
    assert out.count("5-95% interval") == 2
    for png in ("loss_vs_compute.png", "isoflop.png", "fit_vs_observed.png"):
        data = (tmp_path / "plots" / png).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000, png


def test_cli_missing_results_is_one_line_error(tmp_path, capsys):
    assert main(["fit", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: no results file at {tmp_path / 'results.jsonl'}\n"
