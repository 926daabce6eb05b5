"""The implementation switch (pallas_kernels/implementation.py) and the verified table.

- `auto` keeps only the defaults verified on the backend the kernels are traced for (the table),
  and says which it skipped; a forced name runs whatever it names;
- every dispatch inside `kernel_policy` is recorded once: what ran, what refused and why;
- `strict` turns a refusal into a one-line KernelRefused, raised while tracing;
- interpret mode runs only on a CPU: a kernel refuses the other accelerator;
- model.kernels in the config: names checked against each op's implementations, one line each.
"""

import jax
import jax.numpy as jnp
import pytest

from hybrax.arch.config import KernelsConfig, ModelConfig, kernel_implementations
from hybrax.pallas_kernels import implementation, verified
from hybrax.pallas_kernels.implementation import (KernelRefused, dispatch, interpret_mode, kernel_policy,
                                           target_backend)

CALLS = []


def _ok(name):
    def call(x):
        CALLS.append(name)
        return x + 1
    return call


def _refuses(name):
    def call(x):
        CALLS.append(name)
        raise NotImplementedError(f"{name} does not take this\nsecond line")
    return call


OPS = {"xla": _ok("xla"), "fast": _refuses("fast"), "other": _ok("other")}
DEFAULTS = {"tpu": ("fast", "xla"), "gpu": ("other", "xla"), "default": ("xla",)}


def test_auto_keeps_only_verified_defaults_and_reports_what_it_skipped(monkeypatch):
    monkeypatch.setattr(verified, "VERIFIED", (
        verified.Verification("toy", "*", "xla", "0", "-", "test"),
        verified.Verification("toy", "gpu", "other", "0", "-", "test")))
    CALLS.clear()
    with target_backend("tpu"), kernel_policy() as choices:
        assert dispatch("toy", OPS, DEFAULTS, None, 1) == 2
    assert CALLS == ["xla"]   # "fast" is a TPU default but not verified: never tried
    assert choices.report() == ["toy: xla (auto on tpu); not verified on tpu: fast"]
    CALLS.clear()
    with target_backend("gpu"), kernel_policy() as choices:
        dispatch("toy", OPS, DEFAULTS, "auto", 1)
    assert CALLS == ["other"] and choices.ran("toy") == {"other"}


def test_a_forced_list_falls_through_refusals_and_records_why():
    CALLS.clear()
    with kernel_policy() as choices:
        for _ in range(3):   # recorded once, however often it is traced
            assert dispatch("toy", OPS, DEFAULTS, ["fast", "other"], 1) == 2
    assert CALLS == ["fast", "other"] * 3
    assert choices.report() == ["toy: other (fast,other on cpu); fast refused: fast does not take this"]


def test_strict_makes_a_refusal_a_one_line_error():
    with kernel_policy(strict=True), pytest.raises(KernelRefused) as error:
        dispatch("toy", OPS, DEFAULTS, ["fast", "other"], 1)
    assert "\n" not in str(error.value)
    assert "'fast' refused these inputs on cpu (fast does not take this)" in str(error.value)
    with pytest.raises(NotImplementedError):   # without a policy: all refused, one error naming each
        dispatch("toy", OPS, DEFAULTS, "fast", 1)


def test_unknown_names_are_refused_before_any_call():
    CALLS.clear()
    with pytest.raises(ValueError, match=r"implementation='nope' is unknown; valid: 'auto' or \['fast'"):
        dispatch("toy", OPS, DEFAULTS, ["xla", "nope"], 1)
    assert CALLS == []


def test_strict_refusal_happens_at_trace_time_on_a_real_op():
    q = jnp.ones((1, 8, 2, 4), jnp.bfloat16)
    from hybrax.pallas_kernels import dot_product_attention
    with kernel_policy(strict=True), pytest.raises(KernelRefused, match="cudnn.*needs a GPU"):
        jax.jit(lambda q: dot_product_attention(q, q, q, implementation="cudnn")).lower(q)


def test_interpret_mode_only_on_a_cpu():
    assert interpret_mode("k", "tpu") is True                    # this machine is a CPU
    with target_backend("tpu"):
        assert interpret_mode("k", "tpu") is False
    with target_backend("gpu"), pytest.raises(NotImplementedError, match="TPU kernel; the backend is gpu"):
        interpret_mode("k", "tpu")
    with pytest.raises(ValueError, match="'npu'"):
        with target_backend("npu"):
            pass
    assert implementation.current_backend() == jax.default_backend()


def test_the_shipped_table_verifies_no_hybrax_pallas_kernel_yet():
    from hybrax.layers.softmax.ring_attention import BLOCKS
    tables = {**kernel_implementations(), "dot_product_attention": kernel_implementations()["attention"],
              "ring_attention_block": BLOCKS}
    for row in verified.VERIFIED:
        assert row.implementation in tables[row.op], row
        assert row.implementation not in ("pallas", "pallas_tpu", "pallas_gpu"), row   # until a device check
    assert verified.is_verified("linear_attention", "tpu", "xla")
    assert not verified.is_verified("linear_attention", "gpu", "pallas_gpu")
    assert "| linear_attention | * | xla |" in verified.table()


@pytest.mark.parametrize("kernels,message", [
    ({"linear_attention": "triton"}, "model.kernels.linear_attention: unknown implementation 'triton'; valid: "
                                     "'auto' or ['pallas', 'pallas_gpu', 'pallas_tpu', 'reference', 'xla']"),
    ({"attention": []}, "model.kernels.attention=[] names nothing"),
    ({"grouped_matmul": ["auto", "xla"]}, "model.kernels.grouped_matmul: unknown implementation 'auto'"),
    ({"linear": "xla"}, "linear"),
])
def test_bad_kernel_settings_are_one_line_errors(kernels, message):
    with pytest.raises(ValueError) as error:
        ModelConfig(kernels=kernels)
    assert message in str(error.value)


def test_kernel_settings_reach_every_layer_config():
    model = ModelConfig(mixers=["gla", "attention", "moba"], ffns=["moe"], num_layers=3,
                        kernels=KernelsConfig(linear_attention=["pallas_gpu", "xla"], attention="splash",
                                              block_sparse_attention="pallas", grouped_matmul="ragged_dot"))
    (gla, moe), (attention, _), (moba, _) = model.layer_configs()
    assert gla.implementation == ("pallas_gpu", "xla")
    assert attention.implementation == "splash" and attention.prefill_implementation == "pallas"
    assert moba.implementation == "pallas" and moe.implementation == "ragged_dot"
    assert ModelConfig().layer_configs()[0][0].implementation is None   # auto
