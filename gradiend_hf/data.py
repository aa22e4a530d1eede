"""Rows of the GRADIEND schema and their tokenisation into factual/alternative model inputs.

A row: `masked` (text with one "[MASK]"), `factual` (the word that was there), `alternative` (a word of the other
class), `factual_class`, `alternative_class`. The collator turns rows into, for each side (factual, alternative),
`input_ids`, `attention_mask` and `labels` aligned with the logits (the causal shift is already applied), padded to
the longest row of the batch. For the auxiliary objective (causal LM + aux_head.py) the input is left context + one
added mask token (AUXILIARY_MASK_ID) + right context, and `labels` is one class index per row.

Length: with `max_length` (the model's limit, lengths.max_positions), a row that would not fit is refused by name
(RowTooLongError: its text, word, length and the limit) before any model pass, or, with truncation='left', its left
context is cut from the start (then, for inputs that hold it, the right context from the end) so that the feature
word's position, the word's mask or target tokens and the special tokens stay. Both sides of a row get the same cut.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from .objective import AUXILIARY_MASK_ID, AUXILIARY_MLM, CAUSAL_LM, IGNORE_INDEX, MASKED_LM

MASK = "[MASK]"
REQUIRED_COLUMNS = ("masked", "factual", "alternative", "factual_class", "alternative_class")
TRUNCATIONS = ("error", "left")


class RowTooLongError(ValueError):
    """A row whose model input exceeds the model's position limit; names the row, its length, the limit and the fixes.

    `row` counts within the collated rows; `at(offset)` re-states it for a data set whose chunk starts at `offset`."""

    def __init__(self, row: int, text: str, word: str, length: int, limit: int, in_batch: bool = True,
                 truncatable: bool = True) -> None:
        self.row, self.text, self.word, self.length, self.limit = row, text, word, length, limit
        self.in_batch, self.truncatable = in_batch, truncatable
        where = f"row {row} of this batch" if in_batch else f"row {row}"
        shown = text if len(text) <= 80 else text[:37] + " ... " + text[-38:]
        fix = ("shorten the text around the [MASK] or drop the row, or pass truncation='left' (GradiendDataCollator, "
               "evaluate_encoder, evaluate_decoder) to cut the left context to fit" if truncatable else
               "even with its context cut, the word's tokens and the model's special tokens alone do not fit: drop "
               "the row or use a shorter word")
        super().__init__(
            f"{where} ({shown!r}, word {word!r}) is {length} tokens long, but the model takes at most {limit} "
            f"positions; {fix}."
        )

    def __reduce__(self):  # picklable (DataLoader workers, multiprocessing) despite the keyword-rich __init__
        return type(self), (self.row, self.text, self.word, self.length, self.limit, self.in_batch, self.truncatable)

    def at(self, offset: int) -> "RowTooLongError":
        """The same error naming the row by its index in the data (row + offset)."""
        return RowTooLongError(self.row + offset, self.text, self.word, self.length, self.limit, in_batch=False,
                               truncatable=self.truncatable)


def padding_id(tokenizer) -> int:
    """The id that fills padded positions: the pad token, else EOS (as Llama/Mistral/GPT-NeoX set-ups do), else 0.

    Padded positions carry attention_mask 0 and no label, so the id does not change any result (tests check this);
    the user's tokenizer is never changed to get one."""
    for token_id in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if token_id is not None:
            return int(token_id)
    return 0


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
    max_length: Optional[int] = None  # the model's position limit (lengths.max_positions(model)); None: no limit
    truncation: str = "error"  # beyond max_length: 'error' refuses the row by name, 'left' cuts its left context
    specials: SpecialTokens = field(init=False)

    def __post_init__(self) -> None:
        if self.max_length is not None and (isinstance(self.max_length, bool) or not isinstance(self.max_length, int)
                                            or self.max_length < 1):
            raise ValueError(f"max_length must be a positive int (the model's position limit) or None, "
                             f"got {self.max_length!r}.")
        if self.truncation not in TRUNCATIONS:
            raise ValueError(f"truncation must be one of {list(TRUNCATIONS)}, got {self.truncation!r}: 'error' refuses "
                             "rows longer than max_length, 'left' cuts their left context.")
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
        return padding_id(self.tokenizer)

    def start_ids(self) -> list[int]:
        """A causal LM needs something to predict the first word from: BOS (or EOS, as GPT-2 uses it)."""
        tok = self.tokenizer
        for token_id in (tok.bos_token_id, tok.eos_token_id):
            if token_id is not None:
                return [token_id]
        raise ValueError("A row has no left context and the tokenizer has neither BOS nor EOS; add left context.")

    def fit(self, row: int, left: list[int], right: list[int], k: int, text: str, word: str
            ) -> tuple[list[int], list[int]]:
        """The row's (left, right) context cut to fit max_length with a word of k tokens, or RowTooLongError.

        Both sides of a row get the same cut (that of the longer word), so that their two losses differ by the word
        only. What always stays: the special tokens, the word's masks (masked LM) or target tokens (causal LM), the
        auxiliary mask, and for a causal LM without BOS one left token to predict the word from. truncation='left' cuts
        the left context from its start, then (masked inputs only) the right context from its end."""
        limit = self.max_length
        head, tail = self.specials.head, self.specials.tail
        start = [] if head or left else [0]  # stands for start_ids(): one token when there is no left context at all
        if self.objective == MASKED_LM:
            fixed, needs_left, used_right = len(head) + k + len(tail), False, right
        elif self.objective == CAUSAL_LM:  # the right context is not part of a causal input
            fixed, needs_left, used_right = len(head) + len(start) + k - 1, not head and not start, []
        else:
            fixed, needs_left, used_right = len(head) + len(start) + 1 + len(tail), not head and not start, right
        length = fixed + len(left) + len(used_right)
        if limit is None or length <= limit:
            return left, right
        keep_left = 1 if needs_left else 0
        possible = fixed + min(keep_left, len(left)) <= limit
        if self.truncation != "left" or not possible:
            raise RowTooLongError(row, text, word, length, limit, truncatable=possible and self.truncation != "left")
        excess = length - limit
        cut = min(excess, max(len(left) - keep_left, 0))
        left, excess = left[cut:], excess - cut
        return left, right[: len(right) - excess] if excess else right

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
            left_ids, right_ids = self.fitted(rows, left_ids, right_ids, [1] * len(rows), [MASK] * len(rows))
            for side in ("factual", "alternative"):
                classes = [r[f"{side}_class"] for r in rows]
                for key, value in self.auxiliary_side(left_ids, right_ids, classes).items():
                    batch[f"{side}_{key}"] = value
                batch[f"{side}_class"] = torch.tensor([self.class_index(c) for c in classes])
            return batch
        words = {}
        for side in ("factual", "alternative"):
            left_ids, words[side] = word_tokens(self.tokenizer, list(lefts), [r[side] for r in rows])
        longer = ["factual" if len(f) >= len(a) else "alternative"
                  for f, a in zip(words["factual"], words["alternative"])]
        sizes = [len(words[side][i]) for i, side in enumerate(longer)]
        left_ids, right_ids = self.fitted(rows, left_ids, right_ids, sizes, [r[side] for r, side in zip(rows, longer)])
        for side in ("factual", "alternative"):
            for key, value in self.side(left_ids, right_ids, words[side]).items():
                batch[f"{side}_{key}"] = value
            batch[f"{side}_class"] = torch.tensor([self.class_index(r[f"{side}_class"]) for r in rows])
        return batch

    def fitted(self, rows: Sequence[dict[str, Any]], lefts: list[list[int]], rights: list[list[int]], sizes: list[int],
               names: list[str]) -> tuple[list[list[int]], list[list[int]]]:
        """Every row's contexts fitted to max_length (see fit) for a word of sizes[i] tokens named names[i]."""
        if self.max_length is None:
            return lefts, rights
        pairs = [self.fit(i, left, right, k, row["masked"], name)
                 for i, (row, left, right, k, name) in enumerate(zip(rows, lefts, rights, sizes, names))]
        return [p[0] for p in pairs], [p[1] for p in pairs]
