"""Class balancing and train/validation/test splits, deterministic for a seed.

Splits are made over groups, never single rows: "row" mode keeps the rows of one sentence together (no sentence in
two splits), "word" mode holds out whole target words (or names), so the test split measures whether the encoder
generalises to words it never saw in training.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any, Optional, Sequence

SPLITS = ("train", "validation", "test")
Row = dict[str, Any]


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(f) for f in fractions)
    if len(values) != 3 or any(f < 0 for f in values) or abs(sum(values) - 1.0) > 1e-6 or values[0] == 0:
        raise ValueError(f"fractions are (train, validation, test) shares, non-negative, train > 0, summing to 1; "
                         f"got {list(fractions)}.")
    return values  # type: ignore[return-value]


def _rng(seed: int, purpose: str) -> random.Random:
    return random.Random(f"{seed}:{purpose}")  # str seeds hash deterministically (not with Python's hash())


def balance_classes(rows: list[Row], mode: Optional[str] = "downsample", max_per_class: Optional[int] = None,
                    seed: int = 0) -> list[Row]:
    """Downsample every class to the smallest one ("downsample"), and/or cap each class at `max_per_class` rows.

    The kept rows keep their original order, so balancing does not shuffle.
    """
    if mode not in (None, "downsample"):
        raise ValueError(f"balance must be 'downsample' or None, got {mode!r}.")
    by_class: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        by_class[row["factual_class"]].append(i)
    limit = min(len(v) for v in by_class.values()) if mode == "downsample" and by_class else None
    if max_per_class is not None:
        limit = max_per_class if limit is None else min(limit, max_per_class)
    if limit is None:
        return rows
    keep: set[int] = set()
    for name in sorted(by_class):
        indices = by_class[name]
        keep.update(indices if len(indices) <= limit else _rng(seed, f"balance:{name}").sample(indices, limit))
    return [row for i, row in enumerate(rows) if i in keep]


def _assign(units: list[tuple[Any, int]], fractions: tuple[float, float, float]) -> dict[Any, str]:
    """Greedy: each unit (largest first) goes to the split furthest below its row target; no used split stays empty."""
    total = sum(n for _, n in units)
    targets = [f * total for f in fractions]
    counts = [0, 0, 0]
    members: list[list[tuple[Any, int]]] = [[], [], []]
    for unit, n in units:
        best = max(range(3), key=lambda s: (targets[s] - counts[s], -s) if fractions[s] > 0 else (-float("inf"), -s))
        counts[best] += n
        members[best].append((unit, n))
    for s in range(3):  # a split with a share but no unit takes the smallest unit of the fullest split
        if fractions[s] > 0 and not members[s]:
            donor = max(range(3), key=lambda d: len(members[d]))
            if len(members[donor]) > 1:
                smallest = min(range(len(members[donor])), key=lambda k: members[donor][k][1])
                members[s].append(members[donor].pop(smallest))
    return {unit: SPLITS[s] for s in range(3) for unit, _ in members[s]}


def split_rows(rows: list[Row], by: str = "row", fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0,
               group_column: str = "sentence_id", word_column: str = "word") -> dict[str, list[Row]]:
    """Rows per split ("train", "validation", "test"), stratified by factual class.

    by="row": groups of `group_column` (one sentence or template) are shuffled and dealt out by `fractions`.
    by="word": every value of `word_column` (the target word, or the name) goes to one split only; the row shares
    then follow `fractions` only approximately. Needs, per class, at least one word per used split.
    """
    shares = check_fractions(fractions)
    if by not in ("row", "word"):
        raise ValueError(f"split must be 'row' or 'word' (held out by target word), got {by!r}.")
    key = group_column if by == "row" else word_column
    used = sum(1 for f in shares if f > 0)
    owner: dict[Any, str] = {}  # unit -> class of its first row (a unit never spans two splits)
    units: dict[str, dict[Any, int]] = defaultdict(dict)  # class -> unit -> rows
    for row in rows:
        unit = row[key]
        cls = owner.setdefault(unit, row["factual_class"])
        units[cls][unit] = units[cls].get(unit, 0) + 1
    assignment: dict[Any, str] = {}
    for cls in sorted(units):
        counts = units[cls]
        if by == "word" and len(counts) < used:
            raise ValueError(
                f"class {cls!r} has only {len(counts)} distinct target word(s) ({sorted(map(str, counts))}), fewer "
                f"than the {used} splits to hold out words for; use split='row', or add words to the class."
            )
        ordered = sorted(counts, key=str)
        _rng(seed, f"split:{by}:{cls}").shuffle(ordered)
        if by == "word":  # largest first (a stable sort keeps the shuffled order among equal counts)
            ordered.sort(key=lambda u: -counts[u])
        assignment.update(_assign([(u, counts[u]) for u in ordered], shares))
    out: dict[str, list[Row]] = {name: [] for name in SPLITS}
    for row in rows:
        out[assignment[row[key]]].append(row)
    return out
