"""P(class) at the feature position: the sum over the class's words (and their case variants) of P(word | context).

A word of several tokens counts with the product of its token probabilities (teacher-forced for causal LMs, one mask
per token for masked LMs). Words whose model inputs coincide (all one-token words of a causal LM; all words of one
length for a masked LM) share one forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import torch

from ..data import RowTooLongError, split_masked, word_tokens
from ..gradients import side_inputs
from ..objective import IGNORE_INDEX, row_losses, scored_row_losses

if TYPE_CHECKING:
    from .replay import GridForward


def case_variants(word: str) -> list[str]:
    """The word as given, lower-case and capitalised (sentence-initial), without duplicates."""
    return list(dict.fromkeys([word, word.lower(), word[:1].upper() + word[1:]]))


def distinct_spellings(words: Sequence[str], tokenizer: Any) -> list[str]:
    """The words the tokenizer tells apart: an uncased tokenizer reads "She" as "she", which must count only once."""
    seen, kept = set(), []
    for word in words:
        key = tuple(tuple(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in (word, " " + word))
        if key not in seen:
            seen.add(key)
            kept.append(word)
    return kept


def class_words(
    rows: Sequence[Mapping[str, Any]], feature_classes: Sequence[str], tokenizer: Any = None
) -> dict[str, list[str]]:
    """Every word the data uses for each class (factual and alternative), with case variants (those the tokenizer
    tells apart, when one is given)."""
    words: dict[str, dict[str, None]] = {c: {} for c in feature_classes}
    for row in rows:
        for side in ("factual", "alternative"):
            cls = row[f"{side}_class"]
            if cls in words:
                for variant in case_variants(row[side]):
                    words[cls][variant] = None
    if tokenizer is None:
        return {c: list(w) for c, w in words.items()}
    return {c: distinct_spellings(list(w), tokenizer) for c, w in words.items()}


@dataclass
class WordBatch:
    """One forward pass's inputs and, for each word it serves, the labels that pick out that word's tokens."""

    inputs: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]


def longest_words(rows: Sequence[Mapping[str, Any]], words: Sequence[str], tokenizer: Any) -> list[str]:
    """Per row, the word with the most tokens after that row's left context."""
    lefts = [split_masked(row["masked"])[0] for row in rows]
    sizes = {word: [len(t) for t in word_tokens(tokenizer, lefts, [word] * len(rows))[1]] for word in words}
    return [max(words, key=lambda w: sizes[w][i]) for i in range(len(rows))]


def word_batches(rows: Sequence[Mapping[str, Any]], words: Sequence[str], collate) -> list[WordBatch]:
    """Tokenise every row once per word and group words whose model inputs are identical.

    With left truncation every word of a row is scored in the same (cut) context: the collator cuts both sides of a
    row alike, so the unused alternative side carries the row's longest word."""
    groups: dict[bytes, WordBatch] = {}
    truncates = getattr(collate, "truncation", "error") == "left" and getattr(collate, "max_length", None)
    partner = longest_words(rows, words, collate.tokenizer) if truncates and words else None
    for word in words:
        batch = collate([dict(row, factual=word, alternative=partner[i] if partner else word)
                         for i, row in enumerate(rows)])
        inputs = side_inputs(batch, "factual")
        key = inputs["input_ids"].numpy().tobytes() + bytes(inputs["input_ids"].shape)
        groups.setdefault(key, WordBatch(inputs, {})).labels[word] = batch["factual_labels"]
    return list(groups.values())


def chunked_word_batches(
    rows: Sequence[Mapping[str, Any]], words: Sequence[str], collate, batch_size: int
) -> list[list[WordBatch]]:
    """word_batches of every `batch_size` rows, all tokenised before any model pass: a row that does not fit the
    model with one of the class words fails here, named by its index in `rows`."""
    out = []
    for start in range(0, len(rows), batch_size):
        try:
            out.append(word_batches(rows[start : start + batch_size], words, collate))
        except RowTooLongError as error:
            raise error.at(start) from None
    return out


@torch.no_grad()
def word_probabilities(
    base_model: torch.nn.Module, batches: Sequence[WordBatch], forward: Optional["GridForward"] = None
) -> dict[str, torch.Tensor]:
    """P(word | context) per row for every word: exp(-sum of the word's token cross-entropies).

    With a GridForward (decoder grids), only the logits at the words' positions are computed (same numbers)."""
    out = {}
    for batch in batches:
        if forward is None:
            logits = base_model(**batch.inputs).logits
            for word, labels in batch.labels.items():
                out[word] = torch.exp(-row_losses(logits, labels))
            continue
        positions = torch.stack([labels != IGNORE_INDEX for labels in batch.labels.values()]).any(0)
        logits = forward.logits(id(batch), batch.inputs, positions)
        rows = positions.nonzero(as_tuple=True)[0]
        for word, labels in batch.labels.items():
            out[word] = torch.exp(-scored_row_losses(logits, labels[positions], rows, labels.shape[0]))
    return out


def class_probabilities(
    word_probs: Mapping[str, torch.Tensor], words_by_class: Mapping[str, Sequence[str]]
) -> dict[str, torch.Tensor]:
    """P(class) per row: the sum over the class's words."""
    return {c: torch.stack([word_probs[w] for w in ws]).sum(0) for c, ws in words_by_class.items()}
