"""Refusals on purpose: where an implementation raises NotImplementedError by design.

The dispatch contract lets an implementation refuse inputs (the switch then tries the next one),
but in a kernel suite a refusal is a failure unless it is listed here or next to the op's cases,
with its reason: then the test asserts that the refusal happens, with its message. A kernel that
starts refusing a case it used to run is caught, and so is one that stops refusing.

    REFUSED = [*ON_THE_OTHER_ACCELERATOR]             # next to the op's cases
    expect_refusal_or_run(REFUSED, impl, case, lambda: assert_matches_reference(impl, case))
"""

import dataclasses
from collections.abc import Callable, Sequence

import pytest

from hybrax.pallas_kernels.implementation import current_backend

REFUSED_MARK = "refused on purpose:"


@dataclasses.dataclass(frozen=True)
class Refusal:
    implementation: str
    backends: tuple[str, ...]                       # where it refuses ("cpu", "gpu", "tpu")
    match: str                                      # regex of the NotImplementedError message
    reason: str                                     # why it refuses, for the reader
    cases: Callable[[object], bool] = lambda case: True   # which cases (all by default)


# A Pallas kernel runs compiled on the backend it is written for and interpreted on a CPU; on the
# other accelerator it refuses (pallas_kernels.implementation.interpret_mode): interpret mode there
# would be slow and check nothing about either accelerator.
ON_THE_OTHER_ACCELERATOR = (
    Refusal("pallas_tpu", ("gpu",), "is a TPU kernel; the backend is gpu",
            "a TPU kernel neither compiles nor interprets on a GPU"),
    Refusal("pallas_gpu", ("tpu",), "is a GPU kernel; the backend is tpu",
            "a GPU kernel neither compiles nor interprets on a TPU"),
)


def refusal_for(refusals: Sequence[Refusal], implementation: str, case=None) -> Refusal | None:
    """The listed refusal of (implementation, case) on the current backend, or None."""
    backend = current_backend()
    return next((r for r in refusals if r.implementation == implementation and backend in r.backends
                 and r.cases(case)), None)


def expect_refusal_or_run(refusals: Sequence[Refusal], implementation: str, case, run: Callable[[], object]):
    """run() must raise the listed NotImplementedError if (implementation, case) is refused on
    purpose here; otherwise it must pass, and a NotImplementedError fails the test."""
    refusal = refusal_for(refusals, implementation, case)
    if refusal is not None:
        with pytest.raises(NotImplementedError, match=refusal.match):
            run()
        # read back by experiments/bench/device_check.py, which counts these apart from passes
        print(f"{REFUSED_MARK} {implementation} on {current_backend()}: {refusal.reason}")
        return None
    try:
        return run()
    except NotImplementedError as e:
        label = getattr(case, "id", case)
        pytest.fail(f"{implementation} refused {label} on {current_backend()}: {str(e).splitlines()[0]} "
                    "(list it with its reason in the op's REFUSED if that is on purpose)")
