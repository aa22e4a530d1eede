"""Choosing the edit: a grid of candidates theta + lr * dec(ff), each scored for the feature and for language modelling.

Every candidate is applied in place from one backup of the selected weights and reverted exactly (no model copies),
and scored with replay.GridForward: only the layers from the first edited one on and only the scored logits are
computed (the numbers of plain forward passes).
Selection: the best feature metric among candidates whose LMS >= lms_ratio * base LMS; the base itself is always a
candidate, so when no edit keeps the language ability, the answer is "no edit" (with a warning).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..edit import Edit
from ..layout import layout_rules, padded_passes_exact
from ..lengths import check_rows, collator_for
from ..objective import CAUSAL_LM
from .lms import language_modelling_score, lms_batches
from .probabilities import chunked_word_batches, class_probabilities, class_words, word_probabilities
from .replay import GridForward

logger = logging.getLogger("gradiend_hf")
DEFAULT_FEATURE_FACTORS = (1.0, -1.0, 0.0)
NEUTRAL_MAX_LENGTH = 128  # tokens of a neutral text scored by the LMS (its beginning); bounds the grid's cost
LMS_GIVE_UP = 0.5  # once a candidate falls below half the base LMS, larger steps on the same ladder are skipped


def learning_rate_ladder(low: float = 1e-3, high: float = 100.0) -> list[float]:
    """1, 2, 5 steps per decade from `low` to `high` (1e-3, 2e-3, 5e-3, ..., 50, 100)."""
    rates, decade = [], low
    while decade <= high * (1 + 1e-9):
        rates += [m * decade for m in (1, 2, 5) if m * decade <= high * (1 + 1e-9)]
        decade *= 10
    return [float(f"{r:.6g}") for r in rates]


def goal_name(goal: str, classes: Sequence[str]) -> str:
    if goal == "balance" or goal in classes or (goal.startswith("-") and goal[1:] in classes):
        return goal
    raise ValueError(
        f"Unknown goal {goal!r}: use 'balance', a class to strengthen {list(classes)}, or '-<class>' to weaken it."
    )


def score_columns(frame: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """Feature metrics per candidate (higher is better):
    strengthen c = mean P(c) on the other class's rows; weaken c = -mean P(c) on c's own rows;
    balance = mean over all rows of 4 P(a) P(b) (largest when both are equal and high), times the LMS."""
    a, b = classes
    for c, other in ((a, b), (b, a)):
        frame[f"score_{c}"] = frame[f"p_{c}@{other}"]
        frame[f"score_-{c}"] = -frame[f"p_{c}@{c}"]
    frame["score_balance"] = frame["balance_product"] * frame["lms"]
    return frame


@dataclass
class DecoderEvaluation:
    """The grid (one row per candidate, the base first) and the selection rule."""

    grid: pd.DataFrame
    feature_classes: list[str]
    lms_ratio: float
    base_lms: float
    base: dict[str, Any] = field(default_factory=dict)

    def feasible(self) -> pd.DataFrame:
        """Candidates that keep LMS >= lms_ratio x base LMS; the base itself always qualifies."""
        done = self.grid[~self.grid["skipped"]]
        return done[(done["lms"] >= self.lms_ratio * self.base_lms) | done["is_base"]]

    def best(self, goal: str) -> Edit:
        """The best edit for 'balance', '<class>' (strengthen) or '-<class>' (weaken) that keeps the LMS."""
        goal = goal_name(goal, self.feature_classes)
        candidates = self.feasible()
        column = f"score_{goal}"
        if candidates[column].isna().all():
            raise ValueError(f"Goal {goal!r} cannot be scored: the evaluation rows lack one of the classes "
                             f"{self.feature_classes}; evaluate on rows of both classes.")
        chosen = candidates.loc[candidates[column].idxmax()]
        if chosen["is_base"] or chosen[column] <= self.grid.loc[self.grid["is_base"], column].iloc[0]:
            logger.warning("No candidate improves %r while keeping LMS >= %.2f x base; returning the base model "
                           "(no edit).", goal, self.lms_ratio)
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
        }


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
) -> DecoderEvaluation:
    """Score every candidate edit (and the base) on held-out rows and neutral text; see DecoderEvaluation.best.

    Every row is tokenised with every class word before the first model pass: a row longer than the model's position
    limit is refused naming it (truncation='left' cuts its left context instead). Neutral texts are scored on their
    first min(neutral_max_length, limit) tokens (None: the model's limit, or every token if it has none). A model
    whose results padding would change (layout.padded_passes_exact) is run one row per pass."""
    from ..schema import prepare_rows

    classes = model.gradiend_config.feature_classes
    rows = list(prepare_rows(dataset, classes, seed=seed, tokenizer=tokenizer))
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
    forward = GridForward(base_model, model.selected_parameters().values(),
                          cut=layout_rules(base_model, causal, mask_kind=None).cut)

    def measure(ff: float, lr: float, is_base: bool) -> dict[str, Any]:
        per_row = [class_probabilities(word_probabilities(base_model, batches, forward), words) for batches in prepared]
        probs = {c: torch.cat([p[c] for p in per_row]) for c in classes}
        lms = language_modelling_score(base_model, neutral, objective, forward)
        record = {"feature_factor": ff, "learning_rate": lr, "is_base": is_base, "skipped": False,
                  "lms": lms.lms, "nll": lms.nll, "perplexity": lms.perplexity, "accuracy": lms.accuracy}
        for c in classes:
            record[f"p_{c}"] = float(probs[c].mean())
            for i, d in enumerate(classes):
                chosen = probs[c][factual == i]
                record[f"p_{c}@{d}"] = float(chosen.mean()) if len(chosen) else float("nan")
        record["balance_product"] = float((4 * probs[classes[0]] * probs[classes[1]]).mean())
        return record

    factors = list(DEFAULT_FEATURE_FACTORS if feature_factors is None else feature_factors)
    rates = learning_rate_ladder() if learning_rates is None else list(learning_rates)
    editor = model.editor()
    bar = tqdm(total=len(factors) * len(rates), desc="decoder grid", disable=not progress)
    try:
        records = [measure(0.0, 0.0, True)]
        base_lms = records[0]["lms"]
        for ff in factors:
            for sign in (1, -1):  # walk each ladder outwards from small steps, per sign
                ladder = sorted((r for r in rates if (r > 0) == (sign > 0) and r != 0), key=abs)
                given_up = False
                for lr in ladder:
                    bar.update(1)
                    if given_up:
                        records.append({"feature_factor": ff, "learning_rate": lr, "is_base": False, "skipped": True})
                        continue
                    editor.apply(ff, lr)
                    records.append(measure(ff, lr, False))
                    given_up = records[-1]["lms"] < LMS_GIVE_UP * base_lms
    finally:
        editor.restore()
        bar.close()
    grid = score_columns(pd.DataFrame(records), classes)
    return DecoderEvaluation(grid=grid, feature_classes=list(classes), lms_ratio=lms_ratio, base_lms=base_lms)
