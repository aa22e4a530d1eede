"""Finding the grid's choice of edit without scoring every candidate.

The candidates theta + lr * dec(ff) lie on *ladders*: one per feature factor and sign of the learning rate, each
ordered by |lr|. Along a ladder the metrics are smooth in lr, which the selection rule exploits:

- the language-modelling score falls as the step grows, so the ladder's feasible part (LMS >= lms_ratio x base) is
  a prefix, found by bisection (`last_true`: about log2(rungs) scores instead of every rung up to the boundary);
- a feature metric rises and then falls (or only rises, or only falls) over that prefix, so its best rung is found
  by `unimodal_argmax`, which checks the ends first (a monotone metric costs two scores at either end) and
  bisects on the slope otherwise.

The rung a search returns is confirmed locally: its neighbours have been scored and are not better. Where a curve
breaks the assumptions (a dip in the LMS inside the feasible prefix, a second peak), the search can miss a rung the
full grid would take; `evaluate_decoder(search="grid")` scores every rung and stays the reference.
"""

from __future__ import annotations

from typing import Callable, Sequence

Rung = tuple[float, float]  # (feature_factor, learning_rate)


def ladders(feature_factors: Sequence[float], learning_rates: Sequence[float]) -> list[list[Rung]]:
    """One ladder per (feature factor, sign of the learning rate), ordered outwards by |lr|; zero rates are left out
    (lr = 0 is the base, which every ladder shares as its rung -1)."""
    out = []
    for ff in feature_factors:
        for sign in (1, -1):
            rates = sorted((r for r in learning_rates if r != 0 and (r > 0) == (sign > 0)), key=abs)
            if rates:
                out.append([(float(ff), float(r)) for r in rates])
    return out


def last_true(test: Callable[[int], bool], rungs: int) -> int:
    """The largest i in -1..rungs-1 with test(i), for a test that holds up to some rung and fails beyond it (test(-1),
    the base, holds by definition and is not called). Bisection: ceil(log2(rungs + 1)) calls."""
    good, bad = -1, rungs  # test(good) holds; bad is past the end or fails
    while bad - good > 1:
        middle = (good + bad) // 2
        if test(middle):
            good = middle
        else:
            bad = middle
    return good


def unimodal_argmax(score: Callable[[int], float], low: int, high: int) -> int:
    """The i in low..high with the largest score(i), for a score that rises and then falls (either part may be empty).

    The ends are checked first: a score still rising at `high` peaks there, one already falling at `low` peaks there
    (two calls each). Otherwise the slope is bisected: score(m) < score(m + 1) means the peak lies right of m. Ties
    go to the smaller step (the grid's rule: on equal scores the earlier, smaller candidate wins)."""
    if high <= low:
        return low
    if score(high) > score(high - 1):
        return high
    if score(low) >= score(low + 1):
        return low
    while high - low > 2:
        middle = (low + high) // 2
        if score(middle) < score(middle + 1):
            low = middle + 1
        else:
            high = middle
    return max(range(low, high + 1), key=lambda i: (score(i), -i))
