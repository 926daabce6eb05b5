"""The implementation switch shared by every op.

`implementation=None` (or "auto") takes the op's default order for the backend the kernels are
built for and keeps only the implementations recorded as verified there (`verified.py`); a name
or a list of names forces a choice. Each candidate may raise `NotImplementedError` for inputs it
does not support (dtype, backend, masking), and the next one is tried.

What ran is observable: inside `kernel_policy()` every dispatch records which implementation ran,
which were refused and why, and which `auto` skipped as unverified (`KernelChoices.report()`, one
line per op); `kernel_policy(strict=True)` turns a refusal into a one-line `KernelRefused` error at
trace time, before anything compiles.

The backend is `jax.default_backend()` unless `target_backend("tpu")` says otherwise: AOT
compilation for a TPU topology from a CPU host (train/compile.py) traces with the TPU dispatch.
Kernels read it through `current_backend()`; a Pallas kernel runs in interpret mode only on a
CPU, and refuses a backend it was not written for.
"""

import contextlib
import contextvars
import dataclasses
import importlib
from collections.abc import Callable, Mapping, Sequence

import jax

AUTO = "auto"

_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("hybrax_kernel_target", default=None)
_POLICY: contextvars.ContextVar["KernelChoices | None"] = contextvars.ContextVar("hybrax_kernel_policy",
                                                                                 default=None)


class KernelRefused(ValueError):
    """Under `kernel_policy(strict=True)`: an implementation refused its inputs."""


def current_backend() -> str:
    """'cpu', 'gpu' or 'tpu': the backend kernels are traced for."""
    return _TARGET.get() or jax.default_backend()


@contextlib.contextmanager
def target_backend(backend: str):
    """Trace kernels for `backend` ('cpu', 'gpu', 'tpu') whatever the host's default backend is."""
    if backend not in ("cpu", "gpu", "tpu"):
        raise ValueError(f"target backend {backend!r} must be 'cpu', 'gpu' or 'tpu'")
    token = _TARGET.set(backend)
    try:
        yield
    finally:
        _TARGET.reset(token)


def interpret_mode(kernel: str, written_for: str) -> bool:
    """Whether a Pallas kernel written for `written_for` ('tpu' or 'gpu') runs in interpret mode:
    compiled on its own backend, interpreted on a CPU, refused elsewhere."""
    backend = current_backend()
    if backend == written_for:
        return False
    if backend == "cpu":
        return True
    raise NotImplementedError(f"{kernel} is a {written_for.upper()} kernel; the backend is {backend} "
                              "(interpret mode runs only on a CPU)")


@dataclasses.dataclass(frozen=True)
class Choice:
    """One dispatch: the candidates in order, the one that ran, and why the others did not."""

    op: str
    backend: str
    requested: str                               # "auto" or the names given
    ran: str
    refused: tuple[tuple[str, str], ...] = ()    # (name, reason) for each candidate tried before `ran`
    unverified: tuple[str, ...] = ()             # defaults that auto skipped: not verified on this backend

    def line(self) -> str:
        why = [f"{name} refused: {reason}" for name, reason in self.refused]
        if self.unverified:
            why.append(f"not verified on {self.backend}: {', '.join(self.unverified)}")
        return f"{self.op}: {self.ran} ({self.requested} on {self.backend})" + (f"; {'; '.join(why)}" if why else "")


class KernelChoices:
    """The distinct choices made while tracing under `kernel_policy`, in order."""

    def __init__(self, strict: bool):
        self.strict = strict
        self.choices: list[Choice] = []

    def add(self, choice: Choice) -> None:
        if choice not in self.choices:
            self.choices.append(choice)

    def ran(self, op: str) -> set[str]:
        return {c.ran for c in self.choices if c.op == op}

    def report(self) -> list[str]:
        return [c.line() for c in self.choices]


@contextlib.contextmanager
def kernel_policy(strict: bool = False):
    """Record every dispatch traced inside (yields the KernelChoices); strict: refusals are errors."""
    choices = KernelChoices(strict)
    token = _POLICY.set(choices)
    try:
        yield choices
    finally:
        _POLICY.reset(token)


def current_choices() -> KernelChoices:
    """The KernelChoices of the enclosing `kernel_policy` (an empty, unattached one outside any)."""
    policy = _POLICY.get()
    return KernelChoices(strict=False) if policy is None else policy


def requested_names(op: str, implementations: Mapping[str, Callable],
                    implementation: str | Sequence[str] | None) -> list[str] | None:
    """The names asked for (None for auto), each checked against the op's implementations."""
    if implementation is None or implementation == AUTO:
        return None
    names = [implementation] if isinstance(implementation, str) else list(implementation)
    if not names:
        raise ValueError(f"{op}: implementation=[] names nothing; valid: 'auto' or names from {sorted(implementations)}")
    for name in names:
        if name not in implementations:
            raise ValueError(f"{op}: implementation={name!r} is unknown; valid: 'auto' or {sorted(implementations)}")
    return names


def dispatch(op: str, implementations: Mapping[str, Callable], defaults: Mapping[str, Sequence[str]],
             implementation: str | Sequence[str] | None, *args, **kwargs):
    """Call the first implementation that accepts the inputs."""
    from hybrax.pallas_kernels.verified import is_verified  # the table imports nothing from here at import time

    backend = current_backend()
    names = requested_names(op, implementations, implementation)
    unverified: list[str] = []
    if names is None:
        names = [n for n in defaults.get(backend, defaults["default"])]
        unverified = [n for n in names if not is_verified(op, backend, n)]
        names = [n for n in names if n not in unverified]
        if not names:
            raise NotImplementedError(f"{op}: no implementation is verified on {backend} (defaults "
                                      f"{list(defaults.get(backend, defaults['default']))}); name one to force it")
    requested = AUTO if implementation is None or implementation == AUTO else ",".join(names)
    policy = _POLICY.get()
    refused: list[tuple[str, str]] = []
    for name in names:
        try:
            out = implementations[name](*args, **kwargs)
        except NotImplementedError as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            if policy is not None and policy.strict:
                raise KernelRefused(f"{op}: implementation {name!r} refused these inputs on {backend} ({reason}); "
                                    "model.kernels.strict=true makes that an error") from e
            refused.append((name, reason))
            continue
        if policy is not None:
            policy.add(Choice(op, backend, requested, name, tuple(refused), tuple(unverified)))
        return out
    raise NotImplementedError(f"{op}: no implementation in {names} accepts these inputs "
                              f"({'; '.join(f'{n}: {r}' for n, r in refused)})")


def lazy_backend(package: str, module: str, function: str) -> Callable:
    """Call `<package>.<module>.<function>`, importing the module only when first used: the kernel
    modules import Pallas, which the reference and xla paths do not need. A module that does not
    exist raises NotImplementedError, so the next implementation is tried."""
    def call(*args, **kwargs):
        full_name = f"{package}.{module}"
        try:
            backend = importlib.import_module(full_name)
        except ModuleNotFoundError as e:
            if e.name != full_name:
                raise
            raise NotImplementedError(f"module {full_name} does not exist") from e
        return getattr(backend, function)(*args, **kwargs)
    return call


def pallas_for_backend(tpu: Callable, gpu: Callable) -> Callable:
    """`implementation='pallas'`: the TPU kernel on a TPU, the GPU kernel on a GPU."""
    def call(*args, **kwargs):
        backend = current_backend()
        if backend == "tpu":
            return tpu(*args, **kwargs)
        if backend == "gpu":
            return gpu(*args, **kwargs)
        raise NotImplementedError(f"implementation='pallas' needs a TPU or GPU backend; got {backend!r} "
                                  "(force 'pallas_tpu' or 'pallas_gpu' for interpret mode)")
    return call
