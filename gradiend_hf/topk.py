"""Exact global top-k over many tensors without concatenating them: how many to keep, and the k-th largest value.

Pruning (importance scores) and comparison (|decoder| or |encoder| weights of an adapter) both need the k-th largest of
up to hundreds of millions of non-negative values spread over many tensors. For non-negative float32 values the int32
view of the bits orders like the values, so a two-pass radix select (a histogram of the high 16 bits, then of the low
16 bits inside the bucket that holds the k-th value) finds it exactly with only bincount-sized temporaries. Which of
several entries equal to the k-th value are kept is the caller's rule (each documents its order).
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Iterable, Optional, Union

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
