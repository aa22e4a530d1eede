"""Rows of the GRADIEND schema and their tokenisation into factual/alternative model inputs.

A row: `masked` (text with one "[MASK]"), `factual` (the word that was there), `alternative` (a word of the other
class), `factual_class`, `alternative_class`. The collator turns rows into, for each side (factual, alternative),
`input_ids`, `attention_mask` and `labels` aligned with the logits (the causal shift is already applied), padded to
the longest row of the batch. For the auxiliary objective (causal LM + aux_head.py) the input is left context + one
added mask token (AUXILIARY_MASK_ID) + right context, and `labels` is one class index per row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from .objective import AUXILIARY_MASK_ID, AUXILIARY_MLM, CAUSAL_LM, IGNORE_INDEX, MASKED_LM

MASK = "[MASK]"
REQUIRED_COLUMNS = ("masked", "factual", "alternative", "factual_class", "alternative_class")


@dataclass
class SpecialTokens:
    """The special tokens a tokenizer wraps around text, found by probing it once."""

    head: list[int]
    tail: list[int]

    @classmethod
    def of(cls, tokenizer) -> "SpecialTokens":
        probe = "hello"
        plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
        wrapped = tokenizer(probe)["input_ids"]
        for start in range(len(wrapped) - len(plain) + 1):
            if wrapped[start : start + len(plain)] == plain:
                return cls(head=wrapped[:start], tail=wrapped[start + len(plain) :])
        return cls(head=[], tail=[])


def split_masked(text: str) -> tuple[str, str]:
    """(left context, right context) around the single "[MASK]"."""
    count = text.count(MASK)
    if count != 1:
        raise ValueError(f"A masked text needs exactly one {MASK!r}, found {count} in {text!r}.")
    left, right = text.split(MASK)
    return left, right


def word_tokens(tokenizer, lefts: Sequence[str], words: Sequence[str]) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of each left context and of each word *as it appears after that context*.

    Tokenising `context + word` and removing the context's tokens gives the leading-space BPE form (" she") and the
    word-piece form ("she") alike, for any tokenizer.
    """
    contexts = [left.rstrip() for left in lefts]
    joined = [left + word for left, word in zip(lefts, words)]
    context_ids = tokenizer(contexts, add_special_tokens=False)["input_ids"]
    joined_ids = tokenizer(joined, add_special_tokens=False)["input_ids"]
    targets = []
    for ctx, ids, word, text in zip(context_ids, joined_ids, words, joined):
        if ids[: len(ctx)] != ctx:
            # the word merged with the context's last token: tokenise it alone, with its separating space
            sep = " " if text[: len(text) - len(word)].endswith(" ") else ""
            ids = ctx + tokenizer(sep + word, add_special_tokens=False)["input_ids"]
        target = ids[len(ctx):]
        if not target:
            raise ValueError(f"The word {word!r} tokenizes to nothing with this tokenizer; remove it from the data.")
        targets.append(target)
    return context_ids, targets


def pad(sequences: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    return torch.tensor([s + [value] * (width - len(s)) for s in sequences], dtype=torch.long)


@dataclass
class GradiendDataCollator:
    """Tokenises GRADIEND rows for a masked or causal LM, padding to the longest row of the batch.

    Masked LM: left context + k mask tokens (k = tokens of that side's word) + right context; labels at the masks.
    Causal LM: left context + all but the last word token; label j sits on the position that predicts token j.
    Auxiliary (objective='auxiliary_mlm'): left context + one AUXILIARY_MASK_ID + right context for both sides (one
    forward pass serves both); labels are rows x 1 holding the side's class index in `feature_classes` (-100 for a
    class outside the pair, e.g. neutral rows: no loss, no gradient).
    """

    tokenizer: Any
    objective: str
    feature_classes: Optional[Sequence[str]] = None
    specials: SpecialTokens = field(init=False)

    def __post_init__(self) -> None:
        if self.objective not in (MASKED_LM, CAUSAL_LM, AUXILIARY_MLM):
            raise ValueError(
                f"objective must be {MASKED_LM!r}, {CAUSAL_LM!r} or {AUXILIARY_MLM!r}, got {self.objective!r}."
            )
        if self.objective == AUXILIARY_MLM and not self.feature_classes:
            raise ValueError(
                "The auxiliary objective labels rows by feature class: pass feature_classes, e.g. "
                "GradiendDataCollator(tokenizer, 'auxiliary_mlm', ['female', 'male'])."
            )
        if self.objective == MASKED_LM and self.tokenizer.mask_token_id is None:
            raise ValueError(
                f"{type(self.tokenizer).__name__} has no mask token, so it cannot serve a masked LM objective; use "
                "the tokenizer of a masked LM, or objective='causal_lm' for a decoder-only model."
            )
        self.specials = SpecialTokens.of(self.tokenizer)

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return 0 if pad_id is None else pad_id

    def start_ids(self) -> list[int]:
        """A causal LM needs something to predict the first word from: BOS (or EOS, as GPT-2 uses it)."""
        tok = self.tokenizer
        for token_id in (tok.bos_token_id, tok.eos_token_id):
            if token_id is not None:
                return [token_id]
        raise ValueError("A row has no left context and the tokenizer has neither BOS nor EOS; add left context.")

    def side(self, lefts: list[list[int]], rights: list[list[int]], words: list[list[int]]) -> dict[str, torch.Tensor]:
        inputs, labels = [], []
        head, tail = self.specials.head, self.specials.tail
        for left, right, word in zip(lefts, rights, words):
            if self.objective == MASKED_LM:
                ids = head + left + [self.tokenizer.mask_token_id] * len(word) + right + tail
                lab = [IGNORE_INDEX] * len(ids)
                start = len(head) + len(left)
                lab[start : start + len(word)] = word
            else:
                prefix = head + left
                if not prefix:
                    prefix = self.start_ids()
                ids = prefix + word[:-1]
                lab = [IGNORE_INDEX] * len(ids)
                lab[len(prefix) - 1 : len(prefix) - 1 + len(word)] = word
            inputs.append(ids)
            labels.append(lab)
        input_ids = pad(inputs, self.pad_id)
        return {
            "input_ids": input_ids,
            "attention_mask": pad([[1] * len(s) for s in inputs], 0),
            "labels": pad(labels, IGNORE_INDEX),
        }

    def auxiliary_side(
        self, lefts: list[list[int]], rights: list[list[int]], classes: list[Any]
    ) -> dict[str, torch.Tensor]:
        inputs = []
        for left, right in zip(lefts, rights):
            prefix = self.specials.head + left
            ids = (prefix or self.start_ids()) + [AUXILIARY_MASK_ID] + right + self.specials.tail
            inputs.append(ids)
        labels = [[i if i >= 0 else IGNORE_INDEX] for i in map(self.class_index, classes)]
        return {
            "input_ids": pad(inputs, self.pad_id),
            "attention_mask": pad([[1] * len(s) for s in inputs], 0),
            "labels": torch.tensor(labels, dtype=torch.long),
        }

    def class_index(self, name: Any) -> int:
        if self.feature_classes is None or name not in self.feature_classes:
            return -1
        return list(self.feature_classes).index(name)

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        missing = [c for c in REQUIRED_COLUMNS if c not in rows[0]]
        if missing:
            raise KeyError(f"Rows lack the column(s) {missing}; a GRADIEND row needs {list(REQUIRED_COLUMNS)}.")
        lefts, rights = zip(*(split_masked(r["masked"]) for r in rows))
        right_ids = self.tokenizer(list(rights), add_special_tokens=False)["input_ids"]
        batch: dict[str, torch.Tensor] = {}
        if self.objective == AUXILIARY_MLM:
            left_ids = self.tokenizer([left.rstrip() for left in lefts], add_special_tokens=False)["input_ids"]
            for side in ("factual", "alternative"):
                classes = [r[f"{side}_class"] for r in rows]
                for key, value in self.auxiliary_side(left_ids, right_ids, classes).items():
                    batch[f"{side}_{key}"] = value
                batch[f"{side}_class"] = torch.tensor([self.class_index(c) for c in classes])
            return batch
        for side in ("factual", "alternative"):
            left_ids, words = word_tokens(self.tokenizer, list(lefts), [r[side] for r in rows])
            for key, value in self.side(left_ids, right_ids, words).items():
                batch[f"{side}_{key}"] = value
            batch[f"{side}_class"] = torch.tensor([self.class_index(r[f"{side}_class"]) for r in rows])
        return batch
