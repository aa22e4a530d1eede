"""Suites of pairwise GRADIENDs: one adapter per pair of classes of a multi-class feature (race, religion, ...).

GRADIEND's bottleneck reads one scalar, so a feature with more than two classes is learnt as a suite of pairs
(asian/black, asian/white, black/white). `train_suite` trains every pair (or the chosen pairs) in one call on one
loaded base model and one data set: each pair gets its own rows (`schema.prepare_rows` with the pair, rows of the other
classes kept as identity rows or dropped) and its own seed search (`seeds.train_seeds`) in `<output_dir>/<pair>/`.

The base is handed back after each pair (GradiendModel.unload), so every pair starts from the same weights and flags;
wrapping never writes to the base's weights. `suite.json` (written atomically after every pair) lists the pairs and
their results; with resume=True a pair whose seed search finished is read back instead of retrained.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from torch import nn
from tqdm.auto import tqdm

from .atomic import write_text_atomically
from .config import GradiendConfig
from .model import GradiendModel
from .schema import OTHER_CLASSES, pair_rows
from .seeds import SEED_REPORT, train_seeds
from .trainer import GradiendTrainingArguments

logger = logging.getLogger("gradiend_hf")
SUITE_FILE = "suite.json"
BEST = "best"  # train_seeds saves the chosen seed's adapter there
Pair = tuple[str, str]
_PLAIN = re.compile(r"[A-Za-z0-9_]")


def pair_label(pair: Sequence[str]) -> str:
    """'a-b': the pair's name in tables, plots and folders."""
    return f"{pair[0]}-{pair[1]}"


def pair_folder(pair: Sequence[str]) -> str:
    """A folder name for the pair: letters, digits and '_' kept, every other byte (the '-' too) written as %xx, so
    that distinct pairs never share a folder and no name escapes the suite folder."""
    def safe(name: str) -> str:
        return "".join(c if _PLAIN.match(c) else "".join(f"%{b:02x}" for b in c.encode()) for c in name)

    return f"{safe(pair[0])}-{safe(pair[1])}"


def suite_pairs(classes: Sequence[str], pairs: Optional[Sequence[Sequence[str]]] = None) -> list[Pair]:
    """The pairs to train: every pair of `classes` in their order (a, b with a before b), or the given ones, checked.

    A pair names two different classes of the data; a pair may not be given twice (nor as b, a after a, b: the same
    neuron with the sign flipped)."""
    classes = list(classes)
    if pairs is None:
        if len(classes) < 2:
            raise ValueError(f"A suite needs data with at least two classes; the data has {classes}.")
        return [(a, b) for a, b in itertools.combinations(classes, 2)]
    if isinstance(pairs, str) or not pairs:
        raise ValueError(f"pairs must be a list of class pairs, e.g. [['asian', 'white'], ['black', 'white']]; "
                         f"got {pairs!r}.")
    out: list[Pair] = []
    for given in pairs:
        if isinstance(given, str) or len(given) != 2:
            raise ValueError(f"Each pair names two classes, e.g. ['black', 'white']; got {given!r}.")
        a, b = given
        if a == b:
            raise ValueError(f"The pair {list(given)} names the same class twice; a pair is two different classes "
                             f"of the data ({classes}).")
        missing = [c for c in (a, b) if c not in classes]
        if missing:
            raise ValueError(f"The pair {list(given)} names {missing}, not a class of the data; the data's classes are "
                             f"{classes}. Fix the pair (or the data).")
        if (a, b) in out or (b, a) in out:
            raise ValueError(f"The pair {list(given)} is given twice (b, a is a, b with the sign flipped); keep one.")
        out.append((a, b))
    return out


@dataclass(frozen=True)
class PairResult:
    """One pair's seed search: where its adapter is, the chosen seed, and the search's report (seed_report.json)."""

    pair: Pair
    folder: Path
    seed: int
    converged: bool
    correlation: Optional[float]
    report: dict[str, Any]

    @property
    def adapter(self) -> Path:
        """The chosen seed's adapter folder (load with GradiendModel.from_pretrained(base, result.adapter))."""
        return self.folder / BEST

    def summary(self) -> dict[str, Any]:
        return {"pair": list(self.pair), "label": pair_label(self.pair), "folder": self.folder.name,
                "seed": self.seed, "converged": self.converged, "correlation": self.correlation,
                "seeds_tried": self.report.get("seeds_tried")}


@dataclass(frozen=True)
class Suite:
    """Every pair's result of one multi-class feature, in pair order, and the folder that holds them."""

    classes: list[str]
    results: dict[Pair, PairResult]
    output_dir: Path

    @property
    def pairs(self) -> list[Pair]:
        return list(self.results)

    def adapters(self) -> dict[str, Path]:
        """{'a-b': adapter folder}: the form comparison.overlap_matrix / decoder_cosine take."""
        return {pair_label(p): r.adapter for p, r in self.results.items()}

    def load(self, pair: Sequence[str], base_model: nn.Module) -> GradiendModel:
        """The pair's adapter on `base_model` (hand the base back with `.unload()` before loading the next one)."""
        return GradiendModel.from_pretrained(base_model, self.results[tuple(pair)].adapter)

    def summary(self) -> dict[str, Any]:
        return {"classes": self.classes, "pairs": [r.summary() for r in self.results.values()]}

    @classmethod
    def read(cls, output_dir: Union[str, os.PathLike]) -> "Suite":
        """A suite folder written by train_suite (its suite.json and each pair's seed_report.json)."""
        root = Path(output_dir)
        path = root / SUITE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{root} holds no {SUITE_FILE}: it is not a suite folder (train_suite writes one).")
        record = json.loads(path.read_text(encoding="utf-8"))
        results = {}
        for entry in record["pairs"]:
            result = finished_pair(root / entry["folder"], tuple(entry["pair"]))
            if result is None:
                raise FileNotFoundError(f"{root / entry['folder']}: the pair {entry['label']} has no finished seed "
                                        "search; train the suite again with resume=True.")
            results[result.pair] = result
        return cls(classes=list(record["classes"]), results=results, output_dir=root)


def finished_pair(folder: Path, pair: Pair) -> Optional[PairResult]:
    """The result of a pair whose seed search finished in `folder` (seed_report.json and best/ are written last,
    atomically), or None. A folder of another pair (its adapter's classes differ) is an error, not a result."""
    report_path = folder / SEED_REPORT
    if not report_path.is_file() or not (folder / BEST / "adapter_config.json").is_file():
        return None
    saved = GradiendConfig.from_file(folder / BEST / "adapter_config.json").feature_classes
    if tuple(saved) != tuple(pair):
        raise ValueError(f"{folder} holds the adapter of the pair {saved}, not {list(pair)}: the folder belongs to "
                         "another suite; choose another output_dir.")
    report = json.loads(report_path.read_text(encoding="utf-8"))
    chosen = next(e for e in report["seeds"] if e["seed"] == report["chosen_seed"])
    return PairResult(pair=pair, folder=folder, seed=report["chosen_seed"], converged=bool(report["chosen_converged"]),
                      correlation=chosen.get("correlation"), report=report)


def base_state(base_model: nn.Module) -> tuple[dict[str, bool], bool]:
    """The flags GradiendModel changes on the base (requires_grad per parameter, training mode)."""
    return {n: p.requires_grad for n, p in base_model.named_parameters()}, base_model.training


def restore_base_state(base_model: nn.Module, state: tuple[dict[str, bool], bool]) -> None:
    flags, training = state
    for name, p in base_model.named_parameters():
        p.requires_grad_(flags.get(name, p.requires_grad))
    base_model.train(training)


def train_suite(
    base_model: nn.Module,
    config: GradiendConfig,
    args: GradiendTrainingArguments,
    train_dataset: Any,
    eval_dataset: Any,
    processing_class: Any,
    pairs: Optional[Sequence[Sequence[str]]] = None,
    seeds: Sequence[int] = (0,),
    other_classes: str = "identity",
    enough: int = 1,
    resume: bool = False,
    progress: bool = True,
    **trainer_kwargs: Any,
) -> Suite:
    """Train a GRADIEND for every pair of the data's classes (or the given `pairs`) on one base model.

    `config`'s feature_classes are replaced per pair (the first class of a pair reads +1). Each pair runs
    `train_seeds(seeds, enough)` into `<args.output_dir>/<a>-<b>/` (seed folders, best/, seed_report.json) on its own
    training rows (`schema.pair_rows` with `other_classes`: "identity" keeps the other classes' rows as label-0 identity
    rows, "drop" leaves them out); its validation rows are the pair's own (other classes dropped), so the validation
    correlation and convergence read the pair as in a single run. The base model is handed back unchanged after each
    pair.

    resume: a pair whose seed search finished is read back, not retrained; an interrupted one continues from its
    seeds' last complete checkpoints. Without resume every pair is trained afresh.
    """
    from .schema import classes_of

    if other_classes not in OTHER_CLASSES:
        raise ValueError(f"other_classes must be one of {list(OTHER_CLASSES)}, got {other_classes!r}.")
    classes = list(classes_of(train_dataset))
    chosen = suite_pairs(classes, pairs)
    root = Path(args.output_dir)
    folders = [pair_folder(p) for p in chosen]
    state = base_state(base_model)
    results: dict[Pair, PairResult] = {}
    bar = tqdm(chosen, desc="suite pairs", disable=not progress)
    try:
        for pair, folder in zip(bar, folders):
            bar.set_postfix_str(pair_label(pair))
            done = finished_pair(root / folder, pair) if resume else None
            if done is not None:
                logger.info("suite: pair %s had finished; it is kept, not retrained.", pair_label(pair))
                results[pair] = done
                continue
            results[pair] = train_pair(base_model, config, args, train_dataset, eval_dataset, processing_class, pair,
                                       root / folder, seeds, other_classes, enough, resume, **trainer_kwargs)
            restore_base_state(base_model, state)
            if args.should_save:
                write_suite_record(root, classes, results, other_classes)
    finally:
        restore_base_state(base_model, state)
        bar.close()
    if args.should_save:
        write_suite_record(root, classes, results, other_classes)
    return Suite(classes=classes, results=results, output_dir=root)


def train_pair(base_model: nn.Module, config: GradiendConfig, args: GradiendTrainingArguments, train_dataset: Any,
               eval_dataset: Any, processing_class: Any, pair: Pair, folder: Path, seeds: Sequence[int],
               other_classes: str, enough: int, resume: bool, **trainer_kwargs: Any) -> PairResult:
    """One pair's seed search; the chosen adapter hands the base back (train_suite restores the base's flags)."""
    train = pair_rows(train_dataset, pair, seed=args.seed, tokenizer=processing_class, other_classes=other_classes)
    evaluation = (None if eval_dataset is None else  # the validation correlation reads the pair, as in a single run
                  pair_rows(eval_dataset, pair, seed=args.seed, tokenizer=processing_class, other_classes="drop"))
    pair_args = dataclasses.replace(args, output_dir=str(folder))
    search = train_seeds(base_model, config.with_updates(feature_classes=list(pair)), pair_args, train, evaluation,
                         processing_class, seeds=seeds, enough=enough, resume=resume, **trainer_kwargs)
    search.model.unload()
    chosen = next(e for e in search.report["seeds"] if e["seed"] == search.seed)
    return PairResult(pair=pair, folder=folder, seed=search.seed, converged=bool(search.report["chosen_converged"]),
                      correlation=chosen.get("correlation"), report=search.report)


def write_suite_record(root: Path, classes: list[str], results: dict[Pair, PairResult], other_classes: str) -> None:
    record = {"classes": classes, "other_classes": other_classes,
              "pairs": [r.summary() for r in results.values()]}
    write_text_atomically(root / SUITE_FILE, json.dumps(record, indent=2))
