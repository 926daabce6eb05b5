"""The implementation switch shared by every op.

`implementation=None` takes the op's default order for the current backend; a name or a list of
names forces a choice. Each candidate may raise `NotImplementedError` for inputs it does not
support (dtype, backend, masking), and the next one is tried.
"""

import importlib
from collections.abc import Callable, Mapping, Sequence

import jax


def dispatch(op: str, implementations: Mapping[str, Callable], defaults: Mapping[str, Sequence[str]],
             implementation: str | Sequence[str] | None, *args, **kwargs):
    """Call the first implementation that accepts the inputs."""
    if implementation is None:
        names = list(defaults.get(jax.default_backend(), defaults["default"]))
    elif isinstance(implementation, str):
        names = [implementation]
    else:
        names = list(implementation)
    for name in names:
        if name not in implementations:
            raise ValueError(f"{op}: implementation={name!r} is unknown; valid: {sorted(implementations)}")
    reasons = []
    for name in names:
        try:
            return implementations[name](*args, **kwargs)
        except NotImplementedError as e:
            reasons.append(f"{name}: {e}")
    raise NotImplementedError(f"{op}: no implementation in {names} accepts these inputs ({'; '.join(reasons)})")


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
        backend = jax.default_backend()
        if backend == "tpu":
            return tpu(*args, **kwargs)
        if backend == "gpu":
            return gpu(*args, **kwargs)
        raise NotImplementedError(f"implementation='pallas' needs a TPU or GPU backend; got {backend!r} "
                                  "(force 'pallas_tpu' or 'pallas_gpu' for interpret mode)")
    return call
