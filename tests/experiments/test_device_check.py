"""experiments/bench/device_check.py: on a CPU it refuses in one line (exit 2); its dry run writes
every section with sane numbers (the tiny tests pass, the Pallas kernels in interpret mode match
xla, the two 3-step training runs agree); tests are attributed to the implementation they check."""

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from hybrax.experiments.bench.device_check import implementation_of, op_of

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "experiments" / "bench" / "device_check.py"
LINEAR = ["reference", "xla", "pallas_tpu", "pallas_gpu", "pallas"]


@pytest.mark.parametrize("file_stem,test_name,want", [
    ("test_linear_attention", "test_matches_float64_reference[pallas_gpu-T65-decay=channel-C64-float32]", "pallas_gpu"),
    ("test_linear_attention", "test_xla_chunk_size_invariance[scalar]", "xla"),
    ("test_linear_attention", "test_bad_inputs_raise_one_line_errors[kwargs0-q, k, v]", "op"),
    ("test_linear_attention_pallas", "test_tpu_aot_compile_forward_and_backward[None-bfloat16-False]", "pallas_tpu"),
    ("test_linear_attention_pallas", "test_gpu_lowers_to_triton[scalar-float32-True]", "pallas_gpu"),
    ("test_linear_attention_pallas", "test_unaligned_head_dims_match_reference[channel-pallas_tpu]", "pallas_tpu"),
    ("test_block_sparse_attention_gpu", "test_lists_are_deduplicated_pruned_and_inverted", "pallas_gpu"),
    ("test_block_sparse_attention_pallas", "test_prefetched_schedules_obey_their_law[True]", "pallas_tpu"),
])
def test_tests_are_attributed_to_the_implementation_they_check(file_stem, test_name, want):
    assert implementation_of(op_of(file_stem), file_stem, test_name, LINEAR) == want


def test_ops_of_test_files():
    assert [op_of(s) for s in ("test_linear_attention_pallas", "test_block_sparse_attention_gpu",
                               "test_grouped_matmul", "test_flash_attention")] == [
        "linear_attention", "block_sparse_attention", "grouped_matmul", "dot_product_attention"]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="on an accelerator the check runs")
def test_refuses_a_cpu_in_one_line(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}   # no libtpu start-up chatter on stderr
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "x.json")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "needs a GPU or TPU" in result.stderr
    assert not (tmp_path / "x.json").exists()


@pytest.mark.slow
def test_dry_run_writes_every_section(tmp_path):
    """About 80 s on a 2-core CPU: one pytest file, four benchmark tables, two 3-step runs."""
    out = tmp_path / "check.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    check = json.loads(out.read_text())
    env = check["environment"]
    assert env["backend"] == jax.default_backend() and env["versions"]["jax"] == jax.__version__ and env["date"]

    summary = check["tests"]["summary"]["grouped_matmul"]
    assert {name: (c["passed"], c["all_passed"]) for name, c in summary.items()} == {
        "xla": (1, True), "ragged_dot": (1, True), "pallas_tpu": (1, True)}

    tables = check["benchmarks"]
    assert set(tables) == {"linear_attention", "block_sparse_attention", "dot_product_attention", "grouped_matmul"}
    for op, table in tables.items():
        timed = {row[1]: row for row in table["rows"] if row[2] is not None}
        assert "xla" in timed, (op, table["rows"])
        for name, (_, _, forward_ms, both_ms, forward_ratio, both_ratio, error) in timed.items():
            assert 0 < forward_ms < 60_000 and 0 < both_ms < 60_000 and forward_ratio > 0 and both_ratio > 0
            assert error is None or error < 1e-5, (op, name, error)   # float32: every implementation == xla
    for op, kernel in (("linear_attention", "pallas_gpu"), ("block_sparse_attention", "pallas_gpu"),
                       ("grouped_matmul", "ragged_dot")):
        assert kernel in {row[1] for row in tables[op]["rows"] if row[2] is not None}, op
    cudnn = next(row for row in tables["dot_product_attention"]["rows"] if row[1] == "cudnn")
    assert cudnn[2] is None and "NotImplementedError" in cudnn[-1]          # a refusal is a row that says so

    training = check["training"]
    for run in training["runs"].values():
        assert run["exit"] == 0 and len(run["losses"]) == 3
        assert all(math.isfinite(x) and 4.0 < x < 6.5 for x in run["losses"])   # ~ln(259) at the start
    assert any(line.startswith("linear_attention: pallas_gpu") for line in training["runs"]["pallas"]["kernels"])
    comparison = training["comparison"]
    assert comparison["steps_compared"] == 3 and comparison["max_abs_diff"] < 1e-2
