"""Choosing the edit: a grid of candidates theta + lr * dec(ff), each scored for the feature and for language modelling.

Every candidate is applied in place from one backup of the selected weights and reverted exactly (no model copies),
and scored with replay.GridForward: only the layers from the first edited one on and only the scored logits are
computed (the numbers of plain forward passes).
Selection: the best feature metric among candidates whose LMS >= lms_ratio * base LMS; the base itself is always a
candidate, so when no edit keeps the language ability, the answer is "no edit" (with a warning).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..edit import Edit, NonFiniteEdit
from ..layout import layout_rules, padded_passes_exact
from ..lengths import check_rows, collator_for
from ..objective import CAUSAL_LM
from .contexts import KEEP_MASS, ContextScorer, summarise_contexts
from .lms import language_modelling_score, lms_batches
from .probabilities import chunked_word_batches, class_probabilities, class_words, word_probabilities
from .replay import GridForward
from .search import Rung, ladders, last_true, unimodal_argmax

logger = logging.getLogger("gradiend_hf")
DEFAULT_FEATURE_FACTORS = (1.0, -1.0, 0.0)
NEUTRAL_MAX_LENGTH = 128  # tokens of a neutral text scored by the LMS (its beginning); bounds the grid's cost
LMS_GIVE_UP = 0.5  # search="grid": once a candidate falls below half the base LMS, larger steps are skipped
SEARCHES = ("ladder", "grid")


def learning_rate_ladder(low: float = 1e-3, high: float = 100.0) -> list[float]:
    """1, 2, 5 steps per decade from `low` to `high` (1e-3, 2e-3, 5e-3, ..., 50, 100)."""
    rates, decade = [], low
    while decade <= high * (1 + 1e-9):
        rates += [m * decade for m in (1, 2, 5) if m * decade <= high * (1 + 1e-9)]
        decade *= 10
    return [float(f"{r:.6g}") for r in rates]


def all_goals(classes: Sequence[str]) -> list[str]:
    return ["balance", *classes, *(f"-{c}" for c in classes)]


def goal_name(goal: str, classes: Sequence[str]) -> str:
    if goal == "balance" or goal in classes or (goal.startswith("-") and goal[1:] in classes):
        return goal
    raise ValueError(
        f"Unknown goal {goal!r}: use 'balance', a class to strengthen {list(classes)}, or '-<class>' to weaken it."
    )


def goal_scores(record: dict[str, Any], classes: Sequence[str]) -> dict[str, float]:
    """Feature metrics of one candidate (higher is better), by goal:
    strengthen c = mean P(c) on the other class's rows; weaken c = -mean P(c) on c's own rows;
    balance = mean over all rows of 4 P(a) P(b) (largest when both are equal and high), times the LMS."""
    a, b = classes
    scores = {}
    for c, other in ((a, b), (b, a)):
        scores[c] = record[f"p_{c}@{other}"]
        scores[f"-{c}"] = -record[f"p_{c}@{c}"]
    scores["balance"] = record["balance_product"] * record.get("lms", math.nan)  # NaN where the LMS was assumed
    return scores


def context_balance(mean_abs_log_ratio: Any, mass: Any, base_mass: float, keep_mass: float) -> Any:
    """The balance goal in neutral contexts: -mean |log P(a)/P(b)| (0 is best), -inf where the two classes together
    lost more than 1 - keep_mass of the base's probability (an edit must not balance by removing the words)."""
    return np.where(np.asarray(mass) >= keep_mass * base_mass, -np.asarray(mean_abs_log_ratio), -np.inf)


def score_columns(frame: pd.DataFrame, classes: Sequence[str], keep_mass: Optional[float] = None) -> pd.DataFrame:
    """The goal_scores of every candidate as columns score_<goal> (NaN where a candidate was not fully scored).
    With context columns (evaluate_decoder(neutral_contexts=...)), score_balance is their context_balance."""
    for column in ["balance_product", "lms", *[f"p_{c}@{d}" for c in classes for d in classes]]:
        if column not in frame:
            frame[column] = float("nan")
    for goal, values in goal_scores(frame, classes).items():
        frame[f"score_{goal}"] = values
    if "context_mean_abs_log_ratio" in frame:
        base_mass = float(frame.loc[frame["is_base"], "context_mass"].iloc[0])
        scored = frame["context_mean_abs_log_ratio"].notna()
        frame["score_balance"] = np.where(scored, context_balance(frame["context_mean_abs_log_ratio"],
                                                                  frame["context_mass"], base_mass, keep_mass), np.nan)
    return frame


@dataclass
class DecoderEvaluation:
    """The grid (one row per candidate, the base first) and the selection rule."""

    grid: pd.DataFrame
    feature_classes: list[str]
    lms_ratio: float
    base_lms: float
    base: dict[str, Any] = field(default_factory=dict)
    search: str = "grid"
    goals: Optional[list[str]] = None  # the goals a ladder search answered (None: every goal)
    context_frames: dict[Rung, pd.DataFrame] = field(default_factory=dict)  # P(class) per neutral context, by rung

    @property
    def balanced_in_contexts(self) -> bool:
        """The balance goal was judged in neutral contexts (evaluate_decoder(neutral_contexts=...))."""
        return "context_mean_abs_log_ratio" in self.grid

    def feasible(self) -> pd.DataFrame:
        """Candidates that keep LMS >= lms_ratio x base LMS; the base itself always qualifies."""
        done = self.grid[~self.grid["skipped"]]
        return done[(done["lms"] >= self.lms_ratio * self.base_lms) | done["is_base"]]

    def best(self, goal: str) -> Edit:
        """The best edit for 'balance', '<class>' (strengthen) or '-<class>' (weaken) that keeps the LMS."""
        goal = goal_name(goal, self.feature_classes)
        if self.goals is not None and goal not in self.goals:
            raise ValueError(f"The decoder search answered the goals {self.goals}, not {goal!r}: pass goals=[..., "
                             f"{goal!r}] (or search='grid') to evaluate_decoder.")
        candidates = self.feasible()
        column = f"score_{goal}"
        if candidates[column].isna().all():
            raise ValueError(f"Goal {goal!r} cannot be scored: the evaluation rows lack one of the classes "
                             f"{self.feature_classes}; evaluate on rows of both classes.")
        chosen = candidates.loc[candidates[column].idxmax()]
        if chosen["is_base"] or chosen[column] <= self.grid.loc[self.grid["is_base"], column].iloc[0]:
            where = " in the neutral contexts" if goal == "balance" and self.balanced_in_contexts else ""
            logger.warning("No candidate improves %r%s while keeping LMS >= %.2f x base; returning the base model "
                           "(no edit).", goal, where, self.lms_ratio)
            chosen = self.grid[self.grid["is_base"]].iloc[0]
        return Edit(
            feature_factor=float(chosen["feature_factor"]),
            learning_rate=float(chosen["learning_rate"]),
            goal=goal,
            metrics=self.figures(chosen, goal),
        )

    def figures(self, row: pd.Series, goal: str) -> dict[str, Any]:
        """The evaluation figures stored with an edit (and shown on model cards)."""
        base = self.grid[self.grid["is_base"]].iloc[0]
        probabilities = lambda r: {c: float(r[f"p_{c}"]) for c in self.feature_classes}
        optional = lambda r, k: None if pd.isna(r.get(k)) else float(r[k])
        return {
            "goal": goal,
            "feature_factor": float(row["feature_factor"]),
            "learning_rate": float(row["learning_rate"]),
            "score": float(row[f"score_{goal}"]),
            "base_score": float(base[f"score_{goal}"]),
            "lms": float(row["lms"]),
            "base_lms": float(base["lms"]),
            "perplexity": optional(row, "perplexity"),
            "base_perplexity": optional(base, "perplexity"),
            "probabilities": probabilities(row),
            "base_probabilities": probabilities(base),
            **(self.context_figures(row, base) if goal == "balance" and self.balanced_in_contexts else {}),
        }

    def context_figures(self, row: pd.Series, base: pd.Series) -> dict[str, Any]:
        return {"selected_in": "neutral contexts", "contexts": len(next(iter(self.context_frames.values()))),
                "context_abs_log_ratio": float(row["context_mean_abs_log_ratio"]),
                "base_context_abs_log_ratio": float(base["context_mean_abs_log_ratio"]),
                "context_ratio": float(row["context_ratio"]), "base_context_ratio": float(base["context_ratio"])}

    def context_frame(self, edit: Edit) -> Optional[pd.DataFrame]:
        """P(class) per neutral context under `edit` (the base: learning rate 0), if this evaluation scored it."""
        rung = BASE if edit.learning_rate == 0 else (float(edit.feature_factor), float(edit.learning_rate))
        return self.context_frames.get(rung)


def evaluate_decoder(
    model,
    dataset: Any,
    tokenizer: Any,
    neutral_texts: Sequence[str],
    feature_factors: Optional[Sequence[float]] = None,
    learning_rates: Optional[Sequence[float]] = None,
    lms_ratio: float = 0.99,
    batch_size: int = 16,
    max_rows: Optional[int] = None,
    seed: int = 0,
    progress: bool = True,
    truncation: str = "error",
    neutral_max_length: Optional[int] = NEUTRAL_MAX_LENGTH,
    search: str = "ladder",
    goals: Optional[Sequence[str]] = None,
    neutral_contexts: Optional[Sequence[str]] = None,
    context_words: Optional[dict[str, Sequence[str]]] = None,
    keep_mass: float = KEEP_MASS,
) -> DecoderEvaluation:
    """Score candidate edits (and the base) on held-out rows and neutral text; see DecoderEvaluation.best.

    search="ladder" (default) scores only what the selection needs (search.py): per ladder, the LMS of a few rungs to
    find where it stops being kept, then the feature metrics of the rungs that decide each of `goals` (default: every
    goal, i.e. 'balance', each class and '-<class>'). search="grid" scores every rung up to LMS_GIVE_UP (the
    reference the search is tested against).

    neutral_contexts (texts with one [MASK] the class is not decided by, e.g. contexts.gender_neutral_contexts()):
    the debiasing goal 'balance' is then judged where it matters, as the smallest mean |log P(a)/P(b)| over these
    contexts among candidates that keep the LMS and `keep_mass` of the base's P(a) + P(b) there (context_balance);
    the grid gains context_* columns and `context_frames` holds P(class) per context for every rung scored there.
    P(class) there sums `context_words` (default: the class words of the scored rows, with case variants).

    Every row is tokenised with every class word before the first model pass: a row longer than the model's position
    limit is refused naming it (truncation='left' cuts its left context instead). Neutral texts are scored on their
    first min(neutral_max_length, limit) tokens (None: the model's limit, or every token if it has none). A model
    whose results padding would change (layout.padded_passes_exact) is run one row per pass."""
    from ..schema import prepare_rows

    if search not in SEARCHES:
        raise ValueError(f"search must be one of {SEARCHES}, got {search!r}.")
    classes = model.gradiend_config.feature_classes
    goals = all_goals(classes) if goals is None else [goal_name(goal, classes) for goal in goals]
    rows = list(prepare_rows(dataset, classes, seed=seed, tokenizer=tokenizer, other_classes="drop"))
    rows = rows[:max_rows] if max_rows else rows
    factual = torch.tensor([classes.index(r["factual_class"]) for r in rows])
    objective = getattr(model, "lm_objective", model.objective)  # the real LM head, also for the auxiliary objective
    base_model = model.get_base_model()
    collate = collator_for(base_model, tokenizer, objective, classes, truncation)
    words = class_words(rows, classes, tokenizer)
    check_rows(rows, collate)
    causal = objective == CAUSAL_LM
    if not padded_passes_exact(base_model, causal, collate.max_length):
        logger.info("%s: padding would change its numbers, so it is evaluated one row per pass.",
                    type(base_model).__name__)
        batch_size = 1
    prepared = chunked_word_batches(rows, [w for ws in words.values() for w in ws], collate, batch_size)
    lengths = [n for n in (neutral_max_length, collate.max_length) if n is not None]
    neutral = lms_batches(tokenizer, list(neutral_texts), objective, batch_size=batch_size,
                          max_length=min(lengths) if lengths else None, seed=seed)
    # the base runs first: it records what the first edited layer receives, the candidates start from there
    selected, names = model.selected_parameters(), model.bottleneck.names
    forward = GridForward(base_model, [selected[n] for n in names],
                          cut=layout_rules(base_model, causal, mask_kind=None).cut,
                          edited=[model.bottleneck.selected_indices(n) for n in names])

    def measure_lms() -> dict[str, Any]:
        lms = language_modelling_score(base_model, neutral, objective, forward)
        return {"lms": lms.lms, "nll": lms.nll, "perplexity": lms.perplexity, "accuracy": lms.accuracy}

    contexts = None if not neutral_contexts else ContextScorer(base_model, tokenizer, objective, neutral_contexts,
                                                                context_words or words, batch_size, truncation)

    def measure_probabilities() -> dict[str, Any]:
        per_row = [class_probabilities(word_probabilities(base_model, batches, forward), words) for batches in prepared]
        probs = {c: torch.cat([p[c] for p in per_row]) for c in classes}
        record = {}
        for c in classes:
            record[f"p_{c}"] = float(probs[c].mean())
            for i, d in enumerate(classes):
                chosen = probs[c][factual == i]
                record[f"p_{c}@{d}"] = float(chosen.mean()) if len(chosen) else float("nan")
        record["balance_product"] = float((4 * probs[classes[0]] * probs[classes[1]]).mean())
        return record

    factors = list(DEFAULT_FEATURE_FACTORS if feature_factors is None else feature_factors)
    rates = learning_rate_ladder() if learning_rates is None else list(learning_rates)
    scorer = CandidateScorer(model.editor(), measure_lms, measure_probabilities, classes, lms_ratio,
                             contexts.frame if contexts is not None else None, keep_mass)
    return choose_candidates(scorer, ladders(factors, rates), search, goals, progress)


def choose_candidates(scorer: "CandidateScorer", runs: list[list[Rung]], search: str, goals: Sequence[str],
                      progress: bool = False) -> DecoderEvaluation:
    """Score the base, then each ladder (all of it: search="grid"; what the goals need: "ladder"); the model is
    restored afterwards whatever happens."""
    bar = tqdm(total=sum(map(len, runs)), desc=f"decoder {search}", disable=not progress)
    scorer.on_score = lambda: bar.update(1)
    try:
        scorer.full(BASE)
        if scorer.measure_contexts is not None:
            scorer.in_contexts(BASE)
        for ladder in runs:
            if search == "grid":
                scorer.walk(ladder)
            else:
                scorer.search(ladder, goals)
    finally:
        scorer.editor.restore()
        bar.close()
    grid = score_columns(pd.DataFrame(scorer.table(runs)), scorer.classes, scorer.keep_mass)
    return DecoderEvaluation(grid=grid, feature_classes=scorer.classes, lms_ratio=scorer.lms_ratio,
                             base_lms=scorer.records[BASE]["lms"], search=search, context_frames=scorer.frames,
                             goals=list(goals) if search == "ladder" else None)


BASE: Rung = (0.0, 0.0)


class CandidateScorer:
    """Scores candidates on demand, each part once: the LMS first (all that feasibility needs), the class
    probabilities only when the selection needs them. A candidate whose weights would be NaN/inf is infeasible."""

    def __init__(self, editor, measure_lms: Callable[[], dict], measure_probabilities: Callable[[], dict],
                 classes: Sequence[str], lms_ratio: float,
                 measure_contexts: Optional[Callable[[], pd.DataFrame]] = None, keep_mass: float = KEEP_MASS):
        self.editor, self.measure_lms, self.measure_probabilities = editor, measure_lms, measure_probabilities
        self.measure_contexts, self.keep_mass = measure_contexts, keep_mass
        self.classes, self.lms_ratio = list(classes), lms_ratio
        self.records: dict[Rung, dict[str, Any]] = {}
        self.frames: dict[Rung, pd.DataFrame] = {}
        self.inside: set[Rung] = set()  # rungs of a bisected feasible prefix: feasible unless their LMS says otherwise
        self.applied: Optional[Rung] = None
        self.on_score: Callable[[], None] = lambda: None

    def _apply(self, rung: Rung) -> bool:
        if self.applied != rung:
            try:
                self.editor.restore() if rung == BASE else self.editor.apply(*rung)
            except NonFiniteEdit:
                self.applied = None
                return False
            self.applied = rung
        return True

    def lms(self, rung: Rung) -> float:
        record = self.records.setdefault(rung, {})
        if "lms" not in record:
            if self._apply(rung):
                record.update(self.measure_lms())
                self.on_score()
            else:
                record.update(lms=float("nan"), non_finite=True)
        return record["lms"]

    def assumed(self, rung: Rung) -> bool:
        """Inside a bisected prefix with no LMS of its own yet: feasible by the search's assumption (the LMS falls
        as the step grows), so its LMS is not scored unless it is chosen."""
        return rung in self.inside and "lms" not in self.records.get(rung, {})

    def feasible(self, rung: Rung) -> bool:
        if rung == BASE or self.assumed(rung):
            return True
        return self.lms(rung) >= self.lms_ratio * self.lms(BASE)  # NaN compares False

    def full(self, rung: Rung, infeasible_too: bool = False) -> dict[str, Any]:
        """The candidate's class probabilities (and its LMS, unless assumed feasible), where the LMS is kept or
        `infeasible_too`."""
        if not self.assumed(rung):
            lms = self.lms(rung)  # the base first: feasibility is relative to it
            if not self.feasible(rung) and not (infeasible_too and math.isfinite(lms)):
                return self.records[rung]
        record = self.records.setdefault(rung, {})
        if "balance_product" not in record and self._apply(rung):
            record.update(self.measure_probabilities())
        return record

    def in_contexts(self, rung: Rung) -> dict[str, Any]:
        """P(class) in the neutral contexts (where the LMS is kept): context_* figures, the frame in `frames`."""
        record = self.records.setdefault(rung, {})
        if self.feasible(rung) and rung not in self.frames and self._apply(rung):
            self.frames[rung] = self.measure_contexts()
            record.update({f"context_{k}": v for k, v in summarise_contexts(self.frames[rung], self.classes).items()})
        return record

    def contexts_decide(self, goal: str) -> bool:
        return goal == "balance" and self.measure_contexts is not None

    def score(self, rung: Rung, goal: str) -> float:
        """The goal's metric; -inf where the LMS is not kept (so a search never settles there)."""
        if self.contexts_decide(goal):
            record = self.in_contexts(rung)
            if "context_mass" not in record:
                return -math.inf
            base = self.in_contexts(BASE)["context_mass"]
            return float(context_balance(record["context_mean_abs_log_ratio"], record["context_mass"], base,
                                         self.keep_mass))
        if goal == "balance":
            self.lms(rung)  # the held-out balance score weighs by the LMS
        record = self.full(rung)
        if "balance_product" not in record:
            return -math.inf
        value = goal_scores(record, self.classes)[goal]
        return -math.inf if math.isnan(value) else value

    def walk(self, ladder: list[Rung]) -> None:
        """The full grid: every rung outwards, until one falls below LMS_GIVE_UP x base LMS."""
        base = self.records[BASE]["lms"]
        for rung in ladder:
            self.full(rung, infeasible_too=True)
            if self.measure_contexts is not None:
                self.in_contexts(rung)
            record = self.records[rung]
            if not record.get("lms", 0) >= LMS_GIVE_UP * base:  # also NaN (a non-finite edit)
                break

    def search(self, ladder: list[Rung], goals: Sequence[str]) -> None:
        """The ladder's feasible prefix by bisection, then each goal's best rung on it (search.py)."""
        last = last_true(lambda i: self.feasible(ladder[i]), len(ladder))
        at = lambda i: BASE if i < 0 else ladder[i]
        self.inside.update(ladder[: last + 1])
        for goal in goals:
            if not self.contexts_decide(goal) and math.isnan(goal_scores(self.records[BASE], self.classes)[goal]):
                continue  # the rows lack a class: best() says so
            score = lambda i: self.score(at(i), goal)
            best = unimodal_argmax(score, -1, last)
            while True:  # confirmed against both neighbours; a better one (a curve that broke the rule) is followed
                around = [i for i in (best - 1, best + 1) if -1 <= i < len(ladder)]
                better = max(around, key=score, default=best)
                if score(better) <= score(best):
                    break
                best = better
            self.lms(at(best))  # the chosen edit's own LMS
            if not self.feasible(at(best)):  # the LMS broke the rule inside the prefix: score every rung exactly
                self.inside.difference_update(ladder)
                best = max(range(-1, last + 1), key=lambda i: (score(i), -i))
            self.full(at(best))  # the chosen edit's figures

    def table(self, runs: list[list[Rung]]) -> list[dict[str, Any]]:
        """One row per candidate in grid order (the base, then each ladder outwards); unscored ones 'skipped'."""
        rows = [{"feature_factor": 0.0, "learning_rate": 0.0, "is_base": True, "skipped": False,
                 **self.records[BASE]}]
        for ladder in runs:
            for ff, lr in ladder:
                record = self.records.get((ff, lr))
                rows.append({"feature_factor": ff, "learning_rate": lr, "is_base": False, "skipped": record is None,
                             **(record or {})})
        return rows
