"""What a bias benchmark returns: per-example scores, a summary table with bootstrap intervals, and the settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from .bootstrap import CONFIDENCE, N_RESAMPLES, bootstrap_intervals

ALL = "all"


@dataclass
class BenchmarkResult:
    """`examples`: one row per scored example (its texts, the model's scores and the per-example outcome).
    `table`: one row per group (bias type, domain, category; "all" last) with n, each headline metric and its
    bootstrap interval (`<metric>_ci_low`, `<metric>_ci_high`). `settings`: how it was scored (subsample included)."""

    benchmark: str
    examples: pd.DataFrame
    table: pd.DataFrame
    settings: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> pd.DataFrame:
        """The summary table (a copy)."""
        return self.table.copy()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary and settings (no per-example rows), e.g. for a run's results folder."""
        return {"benchmark": self.benchmark, "summary": self.table.to_dict(orient="records"),
                "settings": dict(self.settings)}

    @property
    def frame(self) -> pd.DataFrame:
        """The per-example frame (same as `examples`)."""
        return self.examples

    @property
    def n(self) -> int:
        """Examples behind the overall figures."""
        return int(self.row()["n"])

    def row(self, group: str = ALL) -> pd.Series:
        rows = self.table[self.table.iloc[:, 0] == group]
        if rows.empty:
            raise KeyError(f"No group {group!r} in this result; it has {list(self.table.iloc[:, 0])}.")
        return rows.iloc[0]

    def value(self, metric: str, group: str = ALL) -> float:
        return float(self.row(group)[metric])

    def interval(self, metric: str, group: str = ALL) -> tuple[float, float]:
        row = self.row(group)
        return float(row[f"{metric}_ci_low"]), float(row[f"{metric}_ci_high"])


def subsample(frame: pd.DataFrame, limit: Optional[int], seed: int) -> tuple[pd.DataFrame, dict[str, Any]]:
    """A seeded random subset of `limit` rows (in the data's order), and its record for the result's settings."""
    available = len(frame)
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
            raise ValueError(f"limit must be a positive number of examples (or None for all), got {limit!r}.")
        if limit < available:
            frame = frame.sample(n=int(limit), random_state=seed).sort_index()
    if frame.empty:
        raise ValueError("No examples to score: the selection is empty.")
    return frame.reset_index(drop=True), {"limit": limit, "seed": seed, "available": available, "used": len(frame)}


def summary_table(frame: pd.DataFrame, group_column: str, metrics: Callable[[pd.DataFrame], Mapping[str, float]],
                  groups: Sequence[str], n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE,
                  seed: int = 0) -> pd.DataFrame:
    """One row per group and one for all examples: n, each metric of `metrics(subframe)` and its percentile bootstrap
    interval (examples of that row resampled, `n_resamples` times, seeded)."""
    rows = []
    parts = [(g, frame[frame[group_column] == g]) for g in groups]
    if len(groups) != 1:
        parts.append((ALL, frame))
    for name, part in parts:
        part = part.reset_index(drop=True)
        values = dict(metrics(part))
        intervals = bootstrap_intervals(lambda idx, p=part: metrics(p.iloc[idx]), len(part), n_resamples,
                                        confidence, seed)
        row: dict[str, Any] = {group_column: name, "n": len(part)}
        for metric, value in values.items():
            low, high = intervals[metric]
            row.update({metric: value, f"{metric}_ci_low": low, f"{metric}_ci_high": high})
        rows.append(row)
    table = pd.DataFrame(rows)
    if len(groups) == 1:  # the single group is also the overall figure
        table = pd.concat([table, table.assign(**{group_column: ALL})], ignore_index=True)
    return table
