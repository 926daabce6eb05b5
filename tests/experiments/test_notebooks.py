"""The notebooks in experiments/notebooks run headless, top to bottom, on tiny settings.

Each notebook's first code cell is tagged `parameters`; a cell with small values is injected right
after it (papermill's convention), and a last cell prints the results the test checks as one JSON line.
"""

import json
import pathlib

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
                                     resources={"metadata": {"path": str(REPO)}})
    client.execute()
    for output in nb.cells[-1].outputs:
        if output.get("name") == "stdout" and MARKER in output["text"]:
            return json.loads(output["text"].split(MARKER, 1)[1])
    raise AssertionError(f"{name}: no result printed; last cell outputs: {nb.cells[-1].outputs}")


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


def test_layer_zoo_covers_every_registered_mixer():
    from arch import MIXERS

    result = execute("layer_zoo.ipynb", "D_MODEL, NUM_HEADS, BATCH = 32, 2, 1\nSEQ_LENS, REPEATS = [64, 128], 1",
                     '{"summary": summary, "rows": rows}')
    assert sorted(result["summary"]) == MIXERS.names()
    for name, row in result["summary"].items():
        assert row["output_shape"] == [1, 64, 32], name
        assert row["params"] == row["analytic_params"], name
    assert {(r["mixer"], r["T"]) for r in result["rows"]} == {(m, T) for m in MIXERS.names() for T in (64, 128)}
    assert all(r["us_per_token"] > 0 and r["flops_per_token"] > 0 for r in result["rows"])
