"""The implementation switch shared by every op.

`implementation=None` takes the op's default order for the current backend; a name or a list of
names forces a choice. Each candidate may raise `NotImplementedError` for inputs it does not
support (dtype, backend, masking), and the next one is tried.
"""

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
