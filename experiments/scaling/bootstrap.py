"""Bootstrap intervals for the parametric law: refit on records resampled with replacement."""

from collections.abc import Sequence

import numpy as np

from hybrax.experiments.scaling.parametric import CONSTANTS, MIN_RECORDS, fit_arrays
from hybrax.experiments.scaling.records import law_arrays


def fit_parametric_bootstrap(records: Sequence[dict], *, n: int = 100, seed: int = 0,
                             interval: tuple[float, float] = (5.0, 95.0), params_key: str = "params",
                             delta: float = 1e-3, init_grid: dict | None = None, num_starts: int = 16,
                             resample_starts: int = 4) -> dict:
    """`fit_parametric` on `records`, then on `n` resamples of them drawn with replacement
    (numpy default_rng(seed), so the same seed gives the same intervals).

    Each refit starts from the point estimate and the `resample_starts` best points of the grid.
    Returns the point fit's dict plus "intervals": {constant: (low, high)}, the `interval`
    percentiles of the refits; "samples": {constant: array (n,)}; "num_resamples"; "interval".
    """
    if n < 1:
        raise ValueError(f"n={n} resamples; need at least 1")
    if not 0 <= interval[0] < interval[1] <= 100:
        raise ValueError(f"interval={interval} must be percentiles with 0 <= low < high <= 100")
    num, tokens, losses = law_arrays(records, params_key, min_records=MIN_RECORDS)
    options = dict(delta=delta, init_grid=init_grid)
    point = fit_arrays(num, tokens, losses, num_starts=num_starts, **options)
    rng = np.random.default_rng(seed)
    samples = {name: np.empty(n) for name in CONSTANTS}
    for i in range(n):
        index = rng.integers(0, len(num), size=len(num))
        refit = fit_arrays(num[index], tokens[index], losses[index], num_starts=resample_starts,
                           extra_starts=[point["theta"]], **options)
        for name in CONSTANTS:
            samples[name][i] = refit[name]
    intervals = {name: tuple(float(v) for v in np.percentile(samples[name], interval)) for name in CONSTANTS}
    return {**point, "intervals": intervals, "samples": samples, "num_resamples": n, "interval": tuple(interval)}
