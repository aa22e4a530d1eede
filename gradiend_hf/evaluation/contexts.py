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
from ..layout import layout_rules, padded_passes_exact
from ..lengths import check_rows, collator_for
from ..objective import CAUSAL_LM, lm_objective
from .probabilities import chunked_word_batches, class_probabilities, word_probabilities
from .replay import GridForward

logger = logging.getLogger("gradiend_hf")
KEEP_MASS = 0.9  # a balance edit keeps at least this share of the base's P(a) + P(b) in the neutral contexts

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


class ContextScorer:
    """P(class) at the [MASK] of fixed contexts, for the model as it stands (e.g. under each of many edits).

    The contexts are tokenised once, all before any model pass: one longer than the model's position limit is refused
    naming it (or its left context cut, truncation='left'); a model whose results change with padding is run one
    context per pass. Only the mask position's logits are computed, and a causal LM never runs the words after it
    (replay.GridForward without replay: the same numbers as plain forward passes)."""

    def __init__(self, base_model: torch.nn.Module, tokenizer: Any, objective: str, contexts: Sequence[str],
                 words_by_class: Mapping[str, Sequence[str]], batch_size: int = 16, truncation: str = "error"):
        self.classes = list(words_by_class)
        if len(self.classes) < 2:
            raise ValueError(f"words_by_class needs at least two classes, got {self.classes}.")
        for context in contexts:
            if context.count(MASK) != 1:
                raise ValueError(f"a neutral context needs exactly one {MASK}: {context!r}.")
        causal = lm_objective(objective) == CAUSAL_LM
        collate = collator_for(base_model, tokenizer, lm_objective(objective), self.classes, truncation)
        words = [w for ws in words_by_class.values() for w in ws]
        rows = [dict(masked=c, factual=words[0], alternative=words[0], factual_class=self.classes[0],
                     alternative_class=self.classes[1]) for c in contexts]
        check_rows(rows, collate)
        if not padded_passes_exact(base_model, causal, collate.max_length):
            batch_size = 1  # padding would change its numbers
        self.base_model, self.contexts, self.words_by_class = base_model, list(contexts), words_by_class
        self.batches = chunked_word_batches(rows, words, collate, batch_size)
        self.forward = GridForward(base_model, (), cut=layout_rules(base_model, causal, mask_kind=None).cut)

    @torch.no_grad()
    def frame(self) -> pd.DataFrame:
        """One row per context: its text and P(class) for every class (the sum over the class's words)."""
        parts = []
        for batches in self.batches:
            probs = class_probabilities(word_probabilities(self.base_model, batches, self.forward),
                                        self.words_by_class)
            parts.append(pd.DataFrame({c: probs[c].double().numpy() for c in self.classes}))
        frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({c: [] for c in self.classes})
        frame.insert(0, "context", self.contexts)
        return frame


def context_probabilities(
    base_model: torch.nn.Module,
    tokenizer: Any,
    objective: str,
    contexts: Sequence[str],
    words_by_class: Mapping[str, Sequence[str]],
    batch_size: int = 16,
    truncation: str = "error",
) -> pd.DataFrame:
    """One row per context: P(class) for every class (sum over its words) at the [MASK] (see ContextScorer)."""
    return ContextScorer(base_model, tokenizer, objective, contexts, words_by_class, batch_size, truncation).frame()


def summarise_contexts(frame: pd.DataFrame, classes: Sequence[str]) -> dict[str, float]:
    """Mean P(class), their ratio (first / second class), the mean |log ratio| per context (0 = balanced) and the
    mass, the mean of P(first) + P(second) (an edit must not balance by removing the words)."""
    a, b = classes
    ratio = frame[a].mean() / frame[b].mean()
    return {
        f"p_{a}": float(frame[a].mean()),
        f"p_{b}": float(frame[b].mean()),
        "ratio": float(ratio),
        "mean_abs_log_ratio": float(np.abs(np.log(frame[a] / frame[b])).mean()),
        "mass": float((frame[a] + frame[b]).mean()),
    }
