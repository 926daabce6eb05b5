"""Ahead-of-time compilation for a TPU topology (train.compile): the HLO collective parser on a
hand-written module; the quickstart step compiled for v5e:2x2 held against laws (XLA's FLOPs
against 3 x flops_per_token x tokens, arguments against the state's bytes, a data-parallel
gradient all-reduce that carries every parameter once); the command line's exit codes."""

import os
import pathlib
import subprocess
import sys

import jax
import pytest

from hybrax.train.compile import array_bytes, collectives

ROOT = pathlib.Path(__file__).resolve().parents[2]
# attention by XLA: the FLOP law holds for plain HLO (a Mosaic kernel's FLOPs are its own estimate)
SMALL = ["model.d_model=128", "model.num_layers=2", "data.seq_len=128", "data.batch_size=8",
         "model.kernels.attention=xla"]

HLO = """\
HloModule jit_step, entry_computation_layout={(f32[8,128]{1,0})->f32[32,128]{1,0}}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %add = f32[] add(%x, %y)
}

%wrapped_reduce_scatter (p: bf16[64,128]) -> bf16[16,128] {
  %p = bf16[64,128]{1,0} parameter(0)
  ROOT %reduce-scatter.2 = bf16[16,128]{1,0:T(8,128)(2,1)} reduce-scatter(%p), dimensions={0}
}

ENTRY %main (a: f32[8,128]) -> f32[32,128] {
  %a = f32[8,128]{1,0:T(8,128)} parameter(0)
  %all-gather-start = (f32[8,128]{1,0}, f32[32,128]{1,0}) all-gather-start(%a), channel_id=1, dimensions={0}
  %all-gather-done = f32[32,128]{1,0:T(8,128)S(1)} all-gather-done(%all-gather-start)
  %all-reduce.7 = (f32[]{:T(128)}, bf16[256,4,32]{2,1,0}, /*index=2*/s32[<=16]{0}) all-reduce(%x, %y, %z), to_apply=%add
  %all-reduce-start.1 = f32[1024]{0} all-reduce-start(%b), channel_id=2, to_apply=%add
  %all-reduce-done.1 = f32[1024]{0} all-reduce-done(%all-reduce-start.1)
  %fusion.3 = f32[1024]{0} fusion(%all-reduce-done.1, %all-gather-done), kind=kLoop, calls=%fused
  %collective-permute-start = (f32[4,8]{1,0}, f32[4,8]{1,0}, u32[]{:S(2)}, u32[]{:S(2)}) collective-permute-start(%c)
  %collective-permute-done = f32[4,8]{1,0} collective-permute-done(%collective-permute-start)
  %async-start = ((bf16[64,128]{1,0}), bf16[16,128]{1,0}, s32[]) async-start(%d), calls=%wrapped_reduce_scatter
  %async-done = bf16[16,128]{1,0} async-done(%async-start), calls=%wrapped_reduce_scatter
  %ragged-all-to-all.1 = f8e4m3fn[16,64]{1,0} ragged-all-to-all(%e, %f, %g, %h, %i, %j), replica_groups={{0,1}}
  ROOT %all-to-all = (pred[2,8]{1,0}, s4[2,8]{1,0}) all-to-all(%k, %l), dimensions={0}
}
"""


def test_array_bytes_of_hlo_shapes():
    assert array_bytes("f32[8,128]{1,0:T(8,128)}") == 8 * 128 * 4
    assert array_bytes("(f32[]{:T(128)}, bf16[256,4,32]{2,1,0}, /*index=2*/s32[<=16]{0})") == 4 + 256 * 4 * 32 * 2 + 64
    assert array_bytes("(pred[2,8]{1,0}, s4[2,8]{1,0}, c64[3], token[])") == 16 + 8 + 24


def test_collectives_counted_once_per_async_pair_with_result_bytes():
    assert collectives(HLO) == {
        "all-gather": (1, 32 * 128 * 4),                          # the -done's result, not the -start tuple
        "all-reduce": (2, (4 + 256 * 4 * 32 * 2 + 16 * 4) + 1024 * 4),   # a tuple all-reduce sums its elements
        "collective-permute": (1, 4 * 8 * 4),
        "reduce-scatter": (1, 16 * 128 * 2),                      # wrapped by async-start: counted where it is
        "ragged-all-to-all": (1, 16 * 64),
        "all-to-all": (1, 16 + 8),
    }
    assert collectives("ENTRY %main () -> f32[] {\n  ROOT %c = f32[] constant(0)\n}") == {}


def _tpu():
    pytest.importorskip("libtpu", reason="libtpu not installed (pip install -e '.[test]')")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other jax processes may hold the lock


@pytest.mark.tpu_compile
def test_topology_devices_and_their_hbm():
    _tpu()
    from hybrax.train.compile import GiB, TopologyError, topology_devices
    v5e = topology_devices("v5e:2x4")
    assert (len(v5e.devices), v5e.device_kind, v5e.hbm_bytes) == (8, "TPU v5 lite", 16 * GiB)
    v4 = topology_devices("v4:2x2x1")    # one megacore device per chip, as JAX shows a v4 host
    assert (len(v4.devices), v4.device_kind, v4.hbm_bytes) == (4, "TPU v4", 32 * GiB)
    assert len(topology_devices("v5e:1x1").devices) == 1   # smaller than one host
    with pytest.raises(TopologyError, match="unknown TPU topology 'v9z:2x2'"):
        topology_devices("v9z:2x2")


@pytest.mark.slow
@pytest.mark.tpu_compile
def test_quickstart_data_parallel_on_v5e_obeys_flop_memory_and_gradient_laws():
    _tpu()
    from hybrax.train.compile import compile_step, topology_devices
    from hybrax.train.config import load_config
    from hybrax.train.optim import make_optimizer
    from hybrax.train.step import abstract_state
    config = load_config(ROOT / "configs/quickstart.yaml", [*SMALL, "mesh.data=4"])
    topology = topology_devices("v5e:2x2")
    train = compile_step(config, topology, step="train")
    evaluate = compile_step(config, topology, step="eval")
    tokens_per_device = 8 * 128 / 4
    fpt = config.model.flops_per_token(128)
    print(f"XLA / model FLOPs: train {train.flops / (3 * fpt * tokens_per_device):.4f}, "
          f"eval {evaluate.flops / (fpt * tokens_per_device):.4f}")   # 1.058 and 1.034 with jax 0.10.2
    assert train.model_flops == 3 * fpt * tokens_per_device
    assert 1.0 <= train.flops / train.model_flops <= 1.15     # + cross-entropy, norms, rotary, AdamW
    assert 1.0 <= evaluate.flops / evaluate.model_flops <= 1.15
    assert all(line.endswith("(xla on tpu)") for line in train.kernel_choices)   # traced for the TPU

    # arguments = the (replicated) state + this device's rows of the batch; the state is donated
    _, abstract = abstract_state(config.model, make_optimizer(config.optim, config.train.steps))
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
    batch_bytes = 5 * tokens_per_device * 4
    assert train.memory.arguments == pytest.approx(state_bytes + batch_bytes, rel=0.01)   # TPU tiles pad a little
    assert train.memory.aliased == pytest.approx(state_bytes, rel=0.01)
    assert train.memory.temporaries > 0 and train.memory.fits
    assert train.memory.total == (train.memory.arguments + train.memory.outputs - train.memory.aliased
                                  + train.memory.temporaries)

    # data parallelism: every gradient is all-reduced once (in bf16 or float32); nothing is routed
    count, size = train.collectives["all-reduce"]
    params = config.model.num_params()
    assert count >= 1 and 2 * params <= size <= 4 * params + 1024
    assert not {"all-to-all", "ragged-all-to-all"} & train.collectives.keys()
    assert set(evaluate.collectives) == {"all-reduce"}   # only the metric sums


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.slow
@pytest.mark.tpu_compile
def test_cli_exit_codes_for_a_model_too_big_and_bad_input(capsys):
    _tpu()
    from hybrax.train.compile import main
    unknown = subprocess.run([sys.executable, "-m", "hybrax.train.compile", "--config", "configs/quickstart.yaml",
                              "--topology", "v9z:2x2"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"})
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr, unknown.stderr[-2000:]
    assert len(_error_lines(unknown.stderr)) == 1
    assert "unknown TPU topology 'v9z:2x2'" in _error_lines(unknown.stderr)[0]

    def run(*overrides) -> tuple[int, list[str]]:
        code = main(["--config", str(ROOT / "configs/quickstart.yaml"), "--topology", "v5e:2x2", *SMALL, *overrides])
        return code, _error_lines(capsys.readouterr().err)

    code, errors = run("model.d_model=8192", "model.num_heads=64")   # 1.6B parameters + AdamW: 18 GiB of state
    assert code == 1 and len(errors) == 1 and "does not fit TPU v5 lite HBM" in errors[0], errors
    code, errors = run("mesh.data=8")
    assert code == 2 and len(errors) == 1 and "but 4 are available" in errors[0], errors
    code, errors = run("model.widht=3")
    assert code == 2 and len(errors) == 1 and "unknown config key 'model.widht'" in errors[0], errors
