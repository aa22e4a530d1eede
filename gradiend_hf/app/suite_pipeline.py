"""`gradiend-hf run` of a job with `pairs:`: one adapter per pair of classes on one loaded base, each pair evaluated
like a single run, then the pairs compared; tables, plots and a suite report in one run folder.

Layout inside the run folder (only the entries a run folder may hold, so --resume and --overwrite treat it as any run):

    training/<a>-<b>/                 the pair's seed search (suite.train_suite), training/suite.json
    results/<a>-<b>/                  the pair's evaluation (pipeline.evaluate: encoder, decoder grid, chosen edits,
                                      plots/)
    results/suite.json                the pairs, their evaluation figures and every comparison table's file
    results/cross_encoding.csv ...    the comparison tables (suite_comparison.py)
    plots/cross_encoding.png ...      their heatmaps (suite_plots.py, plotting.py)
    report.md                         the suite report (suite_report.py)

The pairs are checked against the data's classes before anything is written: from the row files, or from the recipe's
classes (its `classes` option or default).
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import datasets

from .job import JobConfig, JobConfigError, RunFailed
from .pipeline import load_base, read_rows, start, timed, write_csv
from .runfolder import RunFolder

logger = logging.getLogger("gradiend_hf")
OVERLAP_K = 0.01  # top 1% of each decoder's entries


def known_classes(job: JobConfig) -> Optional[list[str]]:
    """The data's classes before the data is built: read from the train file, or the recipe's `classes` (option or
    default); None when the recipe does not say (the pairs are then checked once its rows exist)."""
    from ..schema import classes_of

    spec = job.data
    if spec.recipe is None:
        return list(classes_of(read_rows(spec.train)))
    from .. import creation

    parameter = inspect.signature(getattr(creation, spec.recipe)).parameters.get("classes")
    for option in ("classes", "pair"):  # pair: the recipes' older name for two classes
        if spec.options.get(option) is not None:
            return list(spec.options[option])
    if parameter is not None and parameter.default is not inspect.Parameter.empty:
        return list(parameter.default)
    return None


def check_pairs(job: JobConfig, classes: Optional[list[str]]) -> list[tuple[str, str]]:
    """The job's pairs, each naming classes of the data (JobConfigError naming the pair and the data's classes)."""
    from ..suite import suite_pairs

    if classes is None:
        return [tuple(p) for p in job.pairs]
    try:
        return suite_pairs(classes, job.pairs)
    except ValueError as error:
        raise JobConfigError(f"pairs: {error}") from None


def check_pair_rows(data: datasets.DatasetDict, pairs: list[tuple[str, str]]) -> None:
    """Every pair needs rows of both its classes in train, validation and test (to train, pick the best checkpoint
    and evaluate); a class without rows in a split is named with the rows per class the split has."""
    from collections import Counter

    problems = []
    for split in ("train", "validation", "test"):
        counts = Counter(data[split]["factual_class"]) if len(data[split]) else Counter()
        for pair in pairs:
            missing = [c for c in pair if not counts.get(c)]
            if missing:
                problems.append(f"pairs: {list(pair)} has no {split} rows of {missing} (the {split} split has "
                                f"{dict(counts) or 'no rows'}): use more text, other classes, or leave the pair out.")
    if problems:
        raise JobConfigError(problems[0] if len(problems) == 1 else
                             f"{len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True)
class PairFolder(RunFolder):
    """Where pipeline.evaluate writes one pair of a suite: results/<pair>/ its files, results/<pair>/plots/ its plots
    (a pair whose encoder misses the bar gets its own report.md there, saying why)."""

    @property
    def results(self) -> Path:
        return self.root

    @property
    def plots(self) -> Path:
        return self.root / "plots"


def pair_data(data: datasets.DatasetDict, pair: tuple[str, str], tokenizer: Any) -> datasets.DatasetDict:
    """What pipeline.evaluate reads for one pair: the pair's own test rows (other classes dropped), the neutral text."""
    from ..schema import pair_rows

    return datasets.DatasetDict({"test": pair_rows(data["test"], pair, tokenizer=tokenizer, other_classes="drop"),
                                 "neutral": data["neutral"]})


def evaluate_pairs(job: JobConfig, run: RunFolder, suite, base, tokenizer, data,
                   resume: bool = False) -> dict[str, dict[str, Any]]:
    """pipeline.evaluate for every converged pair into results/<pair>/ ({label: {results, edits} or {failed}}).

    resume: a pair whose evaluation.json this run wrote is read back, not evaluated again."""
    from ..edit import Edit
    from ..suite import pair_folder, pair_label
    from .pipeline import evaluate

    out: dict[str, dict[str, Any]] = {}
    for pair, result in suite.results.items():
        label = pair_label(pair)
        if not result.converged:
            out[label] = {"failed": "no seed converged: " + "; ".join(
                f"seed {e['seed']}: " + ", ".join(e["reasons"]) for e in result.report["seeds"])}
            continue
        folder = PairFolder(run.results / pair_folder(pair), run.run_id)
        if resume and (folder.results / "evaluation.json").is_file():
            results = folder.read_json("evaluation.json")  # refuses another run's file
            out[label] = {"results": results, "edits": {g: Edit.from_dict(e) for g, e in results["edits"].items()}}
            continue
        model = suite.load(pair, base)
        try:
            results, edits = evaluate(job.pair_job(pair), folder, model, tokenizer, pair_data(data, pair, tokenizer))
            out[label] = {"results": results, "edits": edits}
        except RunFailed as error:
            out[label] = {"failed": str(error)}
        finally:
            model.unload()
    return out


def compare(job: JobConfig, run: RunFolder, suite, base, tokenizer, data, evaluations) -> dict[str, Any]:
    """The suite's comparison tables (results/*.csv) and heatmaps (plots/*.png)."""
    from ..plotting import plot_cosine, plot_overlap
    from ..suite_comparison import compare_decoders, cross_encode, edit_probabilities
    from ..suite_plots import plot_cross_encoding, plot_edit_probabilities, plot_layers

    spec = job.evaluation
    run.plots.mkdir(parents=True, exist_ok=True)
    with timed(run, "cross-encoding"):
        cross = cross_encode(suite, base, data["test"], tokenizer, max_rows=spec.encoder_rows)
        write_csv(cross.correlation.reset_index(), run.results / "cross_encoding.csv")
        write_csv(cross.means, run.results / "cross_encoding_means.csv")
        plot_cross_encoding(cross, run.plots / "cross_encoding.png")
    with timed(run, "decoder comparison"):
        decoders = compare_decoders(suite, k=OVERLAP_K)
        write_csv(decoders.overlap.overlap.reset_index(names="pair"), run.results / "decoder_overlap.csv")
        write_csv(decoders.cosine.reset_index(names="pair"), run.results / "decoder_cosine.csv")
        write_csv(decoders.by_layer.reset_index(), run.results / "decoder_layers.csv")
        plot_overlap(decoders.overlap, run.plots / "decoder_overlap.png")
        plot_cosine(decoders.cosine, run.plots / "decoder_cosine.png")
        plot_layers(decoders.by_layer, run.plots / "decoder_layers.png")
    chosen = {label: [e for e in entry["edits"].values() if e.learning_rate != 0]  # lr 0: no candidate helped
              for label, entry in evaluations.items() if "edits" in entry}
    with timed(run, "edit probabilities"):
        probabilities = edit_probabilities(suite, base, data["test"], tokenizer,
                                           edits={label: chosen.get(label, []) for label in suite.adapters()},
                                           max_rows_per_class=spec.decoder_rows)
        write_csv(probabilities.frame, run.results / "edit_probabilities.csv")
        plot_edit_probabilities(probabilities, run.plots / "edit_probabilities.png")
    return {"cross": cross, "decoders": decoders, "probabilities": probabilities}


def run_suite(job: JobConfig, mode: str = "new", report: bool = True) -> Path:
    """data -> every pair's training -> every pair's evaluation -> comparison -> report.md; returns the report.

    The run fails (RunFailed, exit code 3) when no pair converged; pairs that did not converge are named in the
    report and left out of the evaluation (their adapters still appear in the comparison)."""
    from ..schema import classes_of
    from ..suite import train_suite
    from .suite_report import suite_record, write_suite_report

    started = time.perf_counter()
    check_pairs(job, known_classes(job))  # before the folder is claimed or anything is loaded
    run, data, resumed = start(job, mode, evaluates=True)
    pairs = check_pairs(job, list(classes_of(data["train"])))
    check_pair_rows(data, pairs)
    with timed(run, "load model"):
        base, tokenizer = load_base(job)
    again = " (resumed)" if resumed else ""  # a resumed run adds its own times beside the first run's
    with timed(run, "training" + again):
        suite = train_suite(base, job.adapter_config(), job.training_arguments(run.training), data["train"],
                            data["validation"], tokenizer, pairs=pairs, seeds=job.seeds,
                            other_classes=job.other_classes or "identity", resume=resumed)
    with timed(run, "pair evaluations" + again):  # each pair's phases: results/<pair>/timings.json
        evaluations = evaluate_pairs(job, run, suite, base, tokenizer, data, resume=resumed)
    tables = compare(job, run, suite, base, tokenizer, data, evaluations)
    timings = run.read_json("timings.json")
    timings["total" + again] = round(time.perf_counter() - started, 1)
    run.write_json("timings.json", timings)
    run.write_json("suite.json", suite_record(job, data, suite, evaluations, tables))
    path = write_suite_report(run) if report else run.root
    if not any(r.converged for r in suite.results.values()):
        raise RunFailed(f"no pair of the suite converged; see {run.report}.")
    return path

