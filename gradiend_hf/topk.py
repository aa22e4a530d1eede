"""Exact global top-k over many tensors without concatenating them: how many to keep, and the k-th largest value.

Pruning (importance scores) and comparison (|decoder| or |encoder| weights of an adapter) both need the k-th largest of
up to hundreds of millions of non-negative values spread over many tensors. For non-negative float32 values the int32
view of the bits orders like the values, so a two-pass radix select (a histogram of the high 16 bits, then of the low
16 bits inside the bucket that holds the k-th value) finds it exactly with only bincount-sized temporaries. Which of
several entries equal to the k-th value are kept is the caller's rule (each documents its order); select_top keeps
them by (parameter order, flat index).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Union

import torch

Keep = Union[int, float]


def count_to_keep(keep: Keep, total: int, allow_zero: bool = False) -> int:
    """Entries to keep: a fraction 0 < keep <= 1 of `total` (rounded half up, at least 1), or a count (an int, at most
    `total`; 0 only with `allow_zero`). 1.0 means everything, 1 means one entry."""
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise TypeError(f"keep must be a fraction (0 < keep <= 1) or a count (int >= 1), got {keep!r}.")
    if isinstance(keep, numbers.Integral):
        if keep < (0 if allow_zero else 1):
            raise ValueError(f"keep={keep!r}: a count of entries to keep must be at least {0 if allow_zero else 1}.")
        return min(int(keep), total)
    if not 0.0 < float(keep) <= 1.0:
        raise ValueError(
            f"keep={keep!r}: a fractional keep must lie in (0, 1]; give an int to keep a count of entries."
        )
    return min(total, max(1, int(math.floor(float(keep) * total + 0.5))))


def magnitude_bits(values: torch.Tensor) -> torch.Tensor:
    """|values| as int32 bit patterns (NaN counts as 0): their integer order is the numeric order of |values|."""
    return torch.nan_to_num(values.float().abs(), nan=0.0).contiguous().view(torch.int32)


def _from_top(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """(bin holding the k-th largest entry, entries in higher bins)."""
    above = torch.flip(counts, [0]).cumsum(0)
    position = int(torch.searchsorted(above, k))  # first cumulative count >= k
    return counts.numel() - 1 - position, int(above[position] - counts[counts.numel() - 1 - position])


def kth_largest_bits(
    bit_tensors: Callable[[], Iterable[torch.Tensor]],
    k: int,
    reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> int:
    """The int32 bit pattern of the k-th largest (1 <= k <= count) non-negative float32 value. `bit_tensors()` yields
    the values' bit patterns (int32 views) and is called twice, so the tensors may be made on the fly and dropped.

    `reduce` (optional) maps each local histogram (int64 counts on the CPU) to the histogram of all values: with the
    values spread over processes, an all-reduce (sum) of the two small histograms makes the select global.
    """

    def histogram(bins: int, digit) -> torch.Tensor:
        counts = torch.zeros(bins, dtype=torch.long)
        for bits in bit_tensors():
            values = digit(bits)
            if values.numel():
                counts += torch.bincount(values.long(), minlength=bins).cpu()
        return counts if reduce is None else reduce(counts)

    high, above = _from_top(histogram(1 << 15, lambda bits: bits >> 16), k)
    low, _ = _from_top(histogram(1 << 16, lambda bits: bits[(bits >> 16) == high] & 0xFFFF), k - above)
    return (high << 16) | low


def bits_to_float(bits: int) -> float:
    return float(torch.tensor(bits, dtype=torch.int32).view(torch.float32))


CHUNK = 1 << 22  # entries per pass over a score tensor: bounds the temporaries of comparisons to a few MB


# --- exact global top-k over per-parameter score tensors, without concatenating them -------------------------------
def keep_count(keep: Keep, total: int) -> int:
    """Entries to keep (topk.count_to_keep): a fraction of `total` rounded half up and at least 1, or a count."""
    return count_to_keep(keep, total)


def chunks(tensor: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, piece) of the flat tensor in CHUNK-sized pieces: comparisons over them keep temporaries small."""
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), CHUNK):
        yield start, flat[start : start + CHUNK]


def _count(scores: Mapping[str, torch.Tensor], op, value) -> int:
    return sum(int(torch.count_nonzero(op(chunk, value))) for s in scores.values() for _, chunk in chunks(s))


def score_problem(scores: Mapping[str, torch.Tensor]) -> Optional[Exception]:
    """The error that score tensors unfit for select_top deserve (None when fit): returned, not raised, so processes
    can agree on raising it together instead of one leaving the others waiting in a collective."""
    for name, s in scores.items():
        if s.dtype != torch.float32 or not s.is_contiguous():
            return TypeError(f"scores of {name} must be a contiguous float32 tensor, got {s.dtype}.")
        for _, chunk in chunks(s):
            if not bool(torch.isfinite(chunk).all()) or bool((chunk < 0).any()):
                return ValueError(f"The importance of {name} holds negative or non-finite values (NaN/inf gradients?).")
    return None


def _check_scores(scores: Mapping[str, torch.Tensor]) -> None:
    problem = score_problem(scores)
    if problem is not None:
        raise problem


def kth_largest(
    scores: Mapping[str, torch.Tensor], k: int, reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
) -> float:
    """The exact k-th largest value over all score tensors (non-negative float32; topk.kth_largest_bits), read in
    chunk-sized pieces: never a copy of the scores. `reduce` sums the radix histograms over processes (see
    kth_largest_bits) when `scores` are one process's slices of the values."""
    pieces = lambda: (chunk.view(torch.int32) for s in scores.values() for _, chunk in chunks(s))  # noqa: E731
    return bits_to_float(kth_largest_bits(pieces, k, reduce))


def select_top(
    scores: dict[str, torch.Tensor],
    keep: Optional[Keep] = None,
    *,
    threshold: Optional[float] = None,
    release: bool = False,
) -> tuple[dict[str, Optional[torch.Tensor]], dict[str, Any]]:
    """The exact global top-k of per-parameter scores (or every entry >= threshold, compared in float32).

    Returns ({name: sorted flat positions (int64), or None when the parameter keeps all its entries}, info). Parameters
    keeping nothing are left out. Ties at the cut are broken by (parameter order, flat index): earlier entries first,
    i.e. the result equals a stable descending sort of the concatenated scores, cut after k.
    With `release=True` each score tensor is removed from `scores` as soon as its positions are known, so the kept
    indices replace the scores instead of adding to them (pre-pruning's accumulators).
    """
    if (keep is None) == (threshold is None):
        raise ValueError("Give exactly one of keep= (a fraction or a count) and threshold= (a minimum importance).")
    names = list(scores)
    if not release:
        scores = dict(scores)
    _check_scores(scores)
    total = sum(s.numel() for s in scores.values())
    if total == 0:
        raise ValueError("There is nothing to prune: the score tensors are empty.")
    if threshold is not None:
        cut = float(torch.tensor(float(threshold), dtype=torch.float32))
        k = _count(scores, torch.ge, cut)
        if k == 0:
            largest = max(float(s.max()) for s in scores.values() if s.numel())
            raise ValueError(f"threshold={threshold!r} keeps no entry; the largest importance is {largest:.6g}.")
        kept = {}
        for name in names:
            s = scores.pop(name)
            count = _count({name: s}, torch.ge, cut)
            if count == s.numel():
                kept[name] = None
            elif count:
                kept[name] = torch.cat([(chunk >= cut).nonzero().squeeze(1) + start for start, chunk in chunks(s)])
            del s
        return kept, {"kept": k, "total": total, "cutoff": cut}
    k = keep_count(keep, total)
    if k == total:
        scores.clear()
        return {name: None for name in names}, {"kept": total, "total": total, "cutoff": 0.0}
    cut = kth_largest(scores, k)
    ties = k - _count(scores, torch.gt, cut)  # entries equal to the cut that still fit, taken in order
    kept = {}
    for name in names:
        s = scores.pop(name)
        greater = _count({name: s}, torch.gt, cut)
        equal = min(ties, _count({name: s}, torch.eq, cut)) if ties else 0
        ties -= equal
        if greater + equal == s.numel():
            kept[name] = None
            continue
        if greater + equal == 0:
            continue
        parts, wanted = [], equal
        for start, chunk in chunks(s):
            parts.append((chunk > cut).nonzero().squeeze(1) + start)
            if wanted:
                tied = (chunk == cut).nonzero().squeeze(1)[:wanted] + start
                wanted -= tied.numel()
                parts.append(tied)
        del s
        kept[name] = torch.cat(parts).sort().values
    return kept, {"kept": k, "total": total, "cutoff": cut}
