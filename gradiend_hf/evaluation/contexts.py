"""P(class) in contexts that do not decide the class: where a debiasing ("balance") edit should show.

Held-out rows say which class is right ("Mary said that [MASK] ..."), so they measure whether the model still knows
the feature. A *neutral context* ("The doctor said that [MASK] would be late.") has no right answer; a model that
prefers one class there is biased, and the balance edit should bring the two probabilities together. The same
probability code as the decoder grid is used (class words with case variants, multi-token words as products).
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from ..data import MASK
from ..layout import padded_passes_exact
from ..lengths import check_rows, collator_for
from ..objective import CAUSAL_LM, lm_objective
from .probabilities import chunked_word_batches, class_probabilities, word_probabilities

logger = logging.getLogger("gradiend_hf")

# Person references that carry no grammatical or lexical gender, and frames whose masked slot is a subject pronoun.
NEUTRAL_SUBJECTS = (
    "The person", "The doctor", "The nurse", "The teacher", "The engineer", "The student", "The lawyer",
    "The secretary", "The manager", "The cook", "The pilot", "The cashier", "The scientist", "The dancer",
    "My neighbour", "My friend", "The child", "The customer", "The driver", "The writer",
)
NEUTRAL_FRAMES = (
    "{subject} said that {mask} would be late today.",
    "{subject} called because {mask} needed some help.",
    "{subject} told me that {mask} had finished the report.",
    "When {subject_lower} arrived, {mask} was very tired.",
    "I asked {subject_lower} whether {mask} wanted coffee.",
    "{subject} smiled because {mask} liked the idea.",
)


def gender_neutral_contexts(
    subjects: Sequence[str] = NEUTRAL_SUBJECTS, frames: Sequence[str] = NEUTRAL_FRAMES
) -> list[str]:
    """Masked sentences about a person of unknown gender (subject x frame), e.g. 'The nurse said that [MASK] ...'."""
    return [
        frame.format(subject=s, subject_lower=s[:1].lower() + s[1:], mask=MASK)
        for s, frame in itertools.product(subjects, frames)
    ]


@torch.no_grad()
def context_probabilities(
    base_model: torch.nn.Module,
    tokenizer: Any,
    objective: str,
    contexts: Sequence[str],
    words_by_class: Mapping[str, Sequence[str]],
    batch_size: int = 16,
    truncation: str = "error",
) -> pd.DataFrame:
    """One row per context: P(class) for every class (sum over its words) at the [MASK].

    All contexts are tokenised first: one longer than the model's position limit is refused naming it (or its left
    context cut, truncation='left'); a model whose results change with padding is run one context per pass."""
    classes = list(words_by_class)
    if len(classes) < 2:
        raise ValueError(f"words_by_class needs at least two classes, got {classes}.")
    for context in contexts:
        if context.count(MASK) != 1:
            raise ValueError(f"a neutral context needs exactly one {MASK}: {context!r}.")
    collate = collator_for(base_model, tokenizer, lm_objective(objective), classes, truncation)
    words = [w for ws in words_by_class.values() for w in ws]
    rows = [dict(masked=c, factual=words[0], alternative=words[0], factual_class=classes[0],
                 alternative_class=classes[1]) for c in contexts]
    check_rows(rows, collate)
    if not padded_passes_exact(base_model, lm_objective(objective) == CAUSAL_LM, collate.max_length):
        batch_size = 1  # padding would change its numbers
    parts = []
    for batches in chunked_word_batches(rows, words, collate, batch_size):
        probs = class_probabilities(word_probabilities(base_model, batches), words_by_class)
        parts.append(pd.DataFrame({c: probs[c].double().numpy() for c in classes}))
    frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({c: [] for c in classes})
    frame.insert(0, "context", list(contexts))
    return frame


def summarise_contexts(frame: pd.DataFrame, classes: Sequence[str]) -> dict[str, float]:
    """Mean P(class), their ratio (first / second class) and the mean |log ratio| per context (0 = balanced)."""
    a, b = classes
    ratio = frame[a].mean() / frame[b].mean()
    return {
        f"p_{a}": float(frame[a].mean()),
        f"p_{b}": float(frame[b].mean()),
        "ratio": float(ratio),
        "mean_abs_log_ratio": float(np.abs(np.log(frame[a] / frame[b])).mean()),
    }


def balance_in_contexts(
    model,
    evaluation,
    tokenizer: Any,
    contexts: Sequence[str],
    words_by_class: Mapping[str, Sequence[str]],
    keep_mass: float = 0.9,
) -> tuple[Any, pd.DataFrame]:
    """The debiasing edit judged where it matters: in neutral contexts.

    Among the grid's candidates that keep the language-modelling score (evaluation.feasible()), the one whose
    P(a)/P(b) in the neutral contexts is closest to 1 (smallest mean |log ratio|), provided both classes together
    keep at least `keep_mass` of the base's probability (an edit must not "balance" by removing the words).
    Returns (Edit, one row per candidate scored); the base model (no edit) when nothing is more balanced.
    """
    from ..edit import Edit

    classes = list(words_by_class)
    base_model = model.get_base_model()
    scored = []
    editor = model.editor()
    try:
        for _, row in evaluation.feasible().iterrows():
            if row["is_base"]:
                editor.restore()
            else:
                editor.apply(float(row["feature_factor"]), float(row["learning_rate"]))
            frame = context_probabilities(base_model, tokenizer, model.objective, contexts, words_by_class)
            scored.append({"feature_factor": float(row["feature_factor"]), "learning_rate": float(row["learning_rate"]),
                           "is_base": bool(row["is_base"]), "lms": float(row["lms"]),
                           **summarise_contexts(frame, classes),
                           "mass": float((frame[classes[0]] + frame[classes[1]]).mean())})
    finally:
        editor.restore()
    table = pd.DataFrame(scored)
    base = table[table["is_base"]].iloc[0]
    allowed = table[table["mass"] >= keep_mass * base["mass"]]
    chosen = allowed.loc[allowed["mean_abs_log_ratio"].idxmin()]
    if chosen["is_base"]:
        logger.warning("No candidate that keeps LMS >= %.2f x base is more balanced in the neutral contexts than the "
                       "base; the balance edit is the base model (no edit).", evaluation.lms_ratio)
    grid = evaluation.grid
    match = grid[(grid["feature_factor"] == chosen["feature_factor"])
                 & (grid["learning_rate"] == chosen["learning_rate"])
                 & (grid["is_base"] == chosen["is_base"])].iloc[0]
    metrics = evaluation.figures(match, "balance")
    metrics.update(selected_in="neutral contexts", contexts=len(contexts),
                   context_abs_log_ratio=float(chosen["mean_abs_log_ratio"]),
                   base_context_abs_log_ratio=float(base["mean_abs_log_ratio"]),
                   context_ratio=float(chosen["ratio"]), base_context_ratio=float(base["ratio"]))
    edit = Edit(feature_factor=float(chosen["feature_factor"]), learning_rate=float(chosen["learning_rate"]),
                goal="balance", metrics=metrics)
    return edit, table
