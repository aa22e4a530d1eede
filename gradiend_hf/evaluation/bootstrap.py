"""Percentile bootstrap confidence intervals over examples (seeded, so a result reproduces exactly)."""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

N_RESAMPLES = 1000
CONFIDENCE = 0.95


def bootstrap_intervals(statistics: Callable[[np.ndarray], Mapping[str, float]], n: int,
                        n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE,
                        seed: int = 0) -> dict[str, tuple[float, float]]:
    """{name: (low, high)}: percentile intervals of each value of `statistics(indices)` over `n_resamples` resamples
    of n example indices drawn with replacement (one set of resamples serves every statistic). Resamples where a
    statistic is undefined (NaN) are left out of its interval; (nan, nan) if n or n_resamples is 0."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}.")
    if n_resamples < 0:
        raise ValueError(f"n_resamples must be at least 0, got {n_resamples}.")
    if n == 0 or n_resamples == 0:
        names = statistics(np.arange(n)).keys()
        return {name: (float("nan"), float("nan")) for name in names}
    rng = np.random.default_rng(seed)
    draws = [dict(statistics(rng.integers(0, n, n))) for _ in range(n_resamples)]
    tail = 100 * (1 - confidence) / 2
    out = {}
    for name in draws[0]:
        values = np.array([d[name] for d in draws], dtype=float)
        values = values[~np.isnan(values)]
        low, high = np.percentile(values, [tail, 100 - tail]) if len(values) else (np.nan, np.nan)
        out[name] = (float(low), float(high))
    return out


def bootstrap_ci(statistic: Callable[[np.ndarray], float], n: int, n_resamples: int = N_RESAMPLES,
                 confidence: float = CONFIDENCE, seed: int = 0) -> tuple[float, float]:
    """(low, high) percentile interval of one statistic of the resampled example indices."""
    if n == 0:
        return float("nan"), float("nan")
    return bootstrap_intervals(lambda idx: {"value": statistic(idx)}, n, n_resamples, confidence, seed)["value"]
