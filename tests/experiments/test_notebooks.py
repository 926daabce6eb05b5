"""The notebooks in experiments/notebooks run headless, top to bottom, on tiny settings.

Each notebook's first code cell is tagged `parameters`; a cell with small values is injected right
after it (papermill's convention), and a last cell prints the results the test checks as one JSON line.
Each notebook starts its own kernel (ipykernel's `python3` spec, run with this interpreter) in its own
folder, as Jupyter opens it, and imports jax there: 10 to 30 s apiece on 2 cores. The quickstart
trains, so it is marked slow.
"""

import json
import math
import pathlib

import numpy as np
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "experiments" / "notebooks"
MARKER = "NOTEBOOK_RESULT "


def execute(name: str, parameters: str, report: str, timeout: int = 240) -> dict:
    """Run notebook `name` with `parameters` injected after its parameters cell; return the JSON
    printed by `report`, an expression evaluated in the notebook's namespace after the last cell."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    index = next(i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", []))
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(parameters))
    nb.cells.append(nbformat.v4.new_code_cell(f"import json\nprint({MARKER!r} + json.dumps({report}))"))
    # kernel "python3" is ipykernel's own spec: jupyter_client launches it with this interpreter
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()
    for output in nb.cells[-1].outputs:
        if output.get("name") == "stdout" and MARKER in output["text"]:
            return json.loads(output["text"].split(MARKER, 1)[1])
    raise AssertionError(f"{name}: no result printed; last cell outputs: {nb.cells[-1].outputs}")


@pytest.mark.slow  # an end-to-end training run: the heaviest of the three (about 30 s on 2 cores)
def test_quickstart_trains_and_samples():
    result = execute("quickstart.ipynb", "D_MODEL, NUM_LAYERS, NUM_HEADS = 32, 2, 2\nSEQ_LEN, BATCH_SIZE = 32, 8\n"
                     "STEPS, EVAL_BATCHES, SAMPLE_TOKENS = 12, 1, 16",
                     '{"losses": losses, "val_loss": evaluation["val_loss"], "params": total, '
                     '"mixers": [m for m, _ in config.model.layer_pattern()], "sample": generate(trained, "ROMEO:", '
                     'max_new_tokens=8)}')
    losses = result["losses"]
    assert len(losses) == 12 and all(map(lambda x: x == x and abs(x) < 1e3, losses))
    assert losses[-1] < losses[0] - 0.3
    assert result["mixers"] == ["gla", "attention"]
    assert result["sample"].startswith("ROMEO:")


@pytest.mark.slow
def test_layer_zoo_covers_every_registered_mixer():
    from hybrax.arch import MIXERS

    result = execute("layer_zoo.ipynb", "D_MODEL, NUM_HEADS, BATCH = 32, 2, 1\nSEQ_LENS, REPEATS = [64, 128], 1",
                     '{"summary": summary, "rows": rows}')
    assert sorted(result["summary"]) == MIXERS.names()
    for name, row in result["summary"].items():
        assert row["output_shape"] == [1, 64, 32], name
        assert row["params"] == row["analytic_params"], name
        formula = 128 * row["kv_cache_bytes_per_token"] + row["state_bytes_per_sequence"]   # one sequence of 128
        assert 0 <= row["cache_bytes"] - formula <= 16, (name, row)
    assert {(r["mixer"], r["T"]) for r in result["rows"]} == {(m, T) for m in MIXERS.names() for T in (64, 128)}
    assert all(r["us_per_token"] > 0 and r["flops_per_token"] > 0 for r in result["rows"])


# L(N, D) = E + A / N**alpha + B / D**beta for two architectures
LAWS = {"attention": {"E": 1.2, "A": 60.0, "alpha": 0.35, "B": 400.0, "beta": 0.30},
        "hybrid_gla": {"E": 1.1, "A": 90.0, "alpha": 0.40, "B": 300.0, "beta": 0.28}}
BUDGETS = (1e13, 1e15)  # training FLOPs C = 6 N D


def synthetic_sweep(directory: pathlib.Path) -> pathlib.Path:
    """results.jsonl of two IsoFLOP profiles per architecture (five sizes from N_opt / 4 to 4 N_opt,
    D = C / 6N) with losses on the law, and one diverged run."""
    lines = []
    for arch, law in LAWS.items():
        alpha, beta = law["alpha"], law["beta"]
        g = (alpha * law["A"] / (beta * law["B"])) ** (1 / (alpha + beta))
        for c in BUDGETS:
            n_opt = g * (c / 6) ** (beta / (alpha + beta))
            for n in n_opt * np.geomspace(0.25, 4, 5):
                n, d = int(n), int(c / 6 / n)
                loss = law["E"] + law["A"] / n ** alpha + law["B"] / d ** beta
                lines.append(json.dumps({
                    "name": f"{arch}-{n}-{d}", "arch": arch, "overrides": [f"model.mixers=[{arch}]"],
                    "params": n, "non_embedding_params": int(0.8 * n), "active_params": n, "tokens": d,
                    "flops": 6.0 * n * d, "val_loss": loss, "val_bpb": loss / math.log(2), "wall_s": 1.0}))
    lines.append(json.dumps({"name": "diverged", "arch": "attention", "overrides": [], "params": 100000,
                             "non_embedding_params": 80000, "active_params": 100000, "tokens": 2000000,
                             "flops": 1.2e12, "val_loss": float("nan"), "val_bpb": float("nan"), "wall_s": 1.0}))
    (directory / "results.jsonl").write_text("\n".join(lines) + "\n")
    return directory


def test_scaling_recovers_a_known_law(tmp_path):
    sweep = synthetic_sweep(tmp_path)
    result = execute("scaling.ipynb", f"SWEEP_DIR = {str(sweep)!r}\nBOOTSTRAP = 2",
                     '{arch: {**{k: fit[k] for k in ("E", "A", "B", "alpha", "beta", "max_relative_error")}, '
                     '"intervals": fit["intervals"], "isoflop_n_exponent": isoflop[arch].n_exponent} '
                     'for arch, fit in fits.items()}')
    assert sorted(result) == sorted(LAWS)
    for arch, law in LAWS.items():
        fit = result[arch]
        assert fit["max_relative_error"] < 1e-3, (arch, fit)
        for key in ("E", "alpha", "beta"):
            assert fit[key] == pytest.approx(law[key], rel=0.05), (arch, key, fit)
        assert set(fit["intervals"]) == {"E", "A", "B", "alpha", "beta"}
        # the IsoFLOP vertices follow N_opt ~ C^(beta / (alpha + beta)) (parabolas: approximately)
        assert fit["isoflop_n_exponent"] == pytest.approx(law["beta"] / (law["alpha"] + law["beta"]), abs=0.05)


def test_scaling_reads_the_committed_sweep_from_its_folder():
    """The default SWEEP_DIR (experiments/results/tiny, relative to the notebook) loads and fits."""
    records = [line for line in (NOTEBOOKS.parent / "results" / "tiny" / "results.jsonl").read_text().splitlines()
               if line.strip()]
    result = execute("scaling.ipynb", "BOOTSTRAP = 0", '{"records": len(records), "fitted": sorted(fits)}')
    assert result == {"records": len(records), "fitted": ["attention", "hybrid_gla"]}
