"""Pre-pruning's importance: |mean gradient| of every selected base-weight entry over a few rows.

The rows are stratified by transition (importance_batches); the gradient engine's post-accumulate-grad hooks add each
batch's weighted gradient straight into ONE float32 accumulator per selected parameter (no per-batch gradient buffer,
no concatenated vector). pruning.pre_prune keeps the top-k of these scores; distributed_pruning computes them across
processes, each reading a share of the rows.
"""

from __future__ import annotations

import random
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from .config import GRADIENT_KINDS
from .gradients import GradientEngine

AGGREGATES = ("mean", "label", "abs")


def importance_batches(
    dataset: Any,
    feature_classes: Sequence[str],
    rows: Optional[int] = 32,
    batch_size: int = 8,
    seed: int = 0,
    tokenizer: Any = None,
) -> list[list[dict]]:
    """The rows pre-pruning reads, as single-transition batches: `rows` rows (None = all) drawn with `seed`, spread as
    evenly as possible over the transitions (round robin, so a small transition gives all it has), batched by
    transition and alternating between transitions as in training."""
    from .sampling import TransitionBatchSampler
    from .schema import prepare_rows

    data = prepare_rows(dataset, feature_classes, seed=seed, tokenizer=tokenizer)
    cols = data.select_columns(["factual_class", "alternative_class"])[:]
    groups: dict[tuple[str, str], list[int]] = {}
    for i, transition in enumerate(zip(cols["factual_class"], cols["alternative_class"])):
        groups.setdefault(transition, []).append(i)
    rng = random.Random(seed)
    for members in groups.values():
        rng.shuffle(members)
    wanted = len(data) if rows is None else int(rows)
    if wanted < 1:
        raise ValueError(f"rows={rows!r}: pre-pruning needs at least one row.")
    quota = {t: 0 for t in groups}
    taken = 0
    while taken < min(wanted, len(data)):
        for t, members in groups.items():
            if quota[t] < len(members) and taken < wanted:
                quota[t] += 1
                taken += 1
    chosen = [i for t, members in groups.items() for i in members[: quota[t]]]
    sampler = TransitionBatchSampler(
        [transition for t in groups for transition in [t] * quota[t]], batch_size, shuffle=False
    )
    return [[data[chosen[j]] for j in batch] for batch in sampler.batches()]


class Selection:
    """What the gradient engine needs of a bottleneck (names, entry shapes, entries), without allocating one."""

    def __init__(
        self, shapes: Mapping[str, Sequence[int]], indices: Optional[Mapping[str, Optional[torch.Tensor]]] = None
    ):
        self.names = list(shapes)
        self.shapes = {n: torch.Size(s) for n, s in shapes.items()}
        self.indices = {n: (indices or {}).get(n) for n in self.names}

    def entry_shape(self, name: str) -> torch.Size:
        idx = self.indices[name]
        return self.shapes[name] if idx is None else torch.Size([idx.numel()])

    def entries(self, name: str, full: torch.Tensor) -> torch.Tensor:
        idx = self.indices[name]
        return full if idx is None else full.reshape(-1).index_select(0, idx)


class ImportanceEngine(GradientEngine):
    """The gradient engine with hooks that add `scale * gradient` (or its absolute value) into one float32
    accumulator per selected parameter, instead of copying it into per-kind buffers: the only full-size memory of
    pre-pruning is the accumulator (plus each parameter's own `.grad`, freed by the hook as it arrives)."""

    def __init__(self, model: nn.Module, selection: Selection) -> None:
        super().__init__(model, selection)
        self.accumulators = {
            name: self.new_accumulator(name, selection.entry_shape(name), p.device) for name, p in self.params.items()
        }
        self._scale, self._absolute = 0.0, False

    def new_accumulator(self, name: str, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """A zero float32 accumulator shaped like the entries; a subclass may hand out a view into a bigger buffer
        (the distributed engine pads it for reduce-scatter without a copy)."""
        return torch.zeros(shape, dtype=torch.float32, device=device)

    def _hook(self, name: str):
        accumulator = self.accumulators[name]

        def gather(param: torch.Tensor) -> None:
            grad = self.bottleneck.entries(name, param.grad)
            if self._absolute:
                grad = grad.abs_()  # the gradient is ours: it is freed right below
            accumulator.add_(grad.reshape(accumulator.shape), alpha=self._scale)
            param.grad = None

        return gather

    def accumulate(self, batch: Mapping[str, torch.Tensor], kind: str, scale: float, absolute: bool = False) -> None:
        """accumulator += scale * gradient of the batch's mean loss of `kind` (factual - alternative for 'diff')."""
        self._scale, self._absolute = float(scale), absolute
        with self.passes(batch) as backward:
            backward(kind, [], last=True)


def batch_label(rows: Sequence[Mapping[str, Any]], feature_classes: Sequence[str], kind: str) -> float:
    """+1 / -1 for the class a batch's gradient points to (its alternative class for kind='alternative', else its
    factual class); 0 for identity transitions (factual class == alternative class)."""
    first = rows[0]
    if first["factual_class"] == first["alternative_class"]:
        return 0.0
    column = "alternative_class" if kind == "alternative" else "factual_class"
    return {feature_classes[0]: 1.0, feature_classes[1]: -1.0}.get(first[column], 0.0)


def importance_weights(
    batches: Sequence[Sequence[Mapping[str, Any]]],
    kind: str,
    aggregate: str = "mean",
    feature_classes: Optional[Sequence[str]] = None,
) -> tuple[list[float], float]:
    """(weight of each batch, sum of |weights|) for `importance`: computed over ALL batches, so processes that each
    read a share of them scale their gradients exactly as one process reading them all."""
    if kind not in GRADIENT_KINDS:
        raise ValueError(f"kind={kind!r} is not a gradient kind; choose one of {list(GRADIENT_KINDS)}.")
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate={aggregate!r} is not known; choose one of {list(AGGREGATES)}.")
    weights = [float(len(rows)) for rows in batches]
    if aggregate == "label":
        if feature_classes is None:
            raise ValueError("aggregate='label' needs the feature classes.")
        weights = [w * batch_label(rows, feature_classes, kind) for w, rows in zip(weights, batches)]
    total = sum(abs(w) for w in weights)
    if total == 0:
        raise ValueError("Pre-pruning found no usable rows (aggregate='label' needs rows of a feature transition).")
    return weights, total


@torch.no_grad()
def accumulate_batches(
    engine: ImportanceEngine,
    batches: Sequence[Sequence[Mapping[str, Any]]],
    weights: Sequence[float],
    total: float,
    collator: Any,
    kind: str,
    aggregate: str = "mean",
    rank: int = 0,
    world_size: int = 1,
) -> None:
    """Add weight/total * gradient of batch i into the engine's accumulators, for the batches i % world_size == rank
    (all of them in one process): the per-process sums add up to `importance`'s single sum."""
    for i, (rows, weight) in enumerate(zip(batches, weights)):
        if weight and i % world_size == rank:
            engine.accumulate(collator(list(rows)), kind, weight / total, absolute=aggregate == "abs")


@torch.no_grad()
def importance(
    base_model: nn.Module,
    selection: Selection,
    batches: Sequence[Sequence[Mapping[str, Any]]],
    collator: Any,
    kind: str,
    aggregate: str = "mean",
    feature_classes: Optional[Sequence[str]] = None,
) -> dict[str, torch.Tensor]:
    """Importance of every selected entry (float32 accumulators shaped like the entries):

    - 'mean': |mean over rows of the gradient| (batches weighted by their row counts), the default;
    - 'label': |mean over rows of label * gradient| (label +-1 by the class the gradient points to, identity rows 0):
      the difference of the two classes' mean gradients, so parts common to both directions cancel;
    - 'abs': mean over rows of |batch gradient| (each batch's gradient taken whole, then its absolute value).
    """
    weights, total = importance_weights(batches, kind, aggregate, feature_classes)
    engine = ImportanceEngine(base_model, selection)
    accumulate_batches(engine, batches, weights, total, collator, kind, aggregate)
    scores = engine.accumulators
    for s in scores.values():
        s.abs_()
    return scores
