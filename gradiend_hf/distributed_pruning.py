"""Pre-pruning's importance and exact global top-k across processes (torch.distributed).

One process reading every row and keeping a full-size importance per selected entry is what pre-pruning costs; with
N processes each reads batches i % N == rank, and the weighted gradient sums are reduce-scattered parameter by
parameter, so a process ends up owning only its contiguous slice (shards.shard_bounds) of every parameter's summed
importance. The exact global top-k over those slices equals the single-process select_top: the k-th largest value
comes from the radix select of topk.kth_largest_bits with all-reduced histograms, ties at the cut go to earlier
(parameter, flat index) entries -- parameter by parameter, a lower rank's slice before a higher one's, which is the
global flat order -- and the kept flat positions (k int64 values in all) are all-gathered, so every process returns
the same {name: positions} as pruning.select_top. Apart from the raw per-process accumulators (freed as each is
reduced), every exchange is small: histograms, per-(rank, parameter) counts, the kept positions.

Errors found on one process (NaN importance, ranks called with different arguments) are exchanged first and raised on
every process, so none is left waiting in a collective.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .importance import ImportanceEngine, Selection, accumulate_batches, importance_weights
from .shards import shard_bounds, shard_chunk
from .topk import Keep, chunks, keep_count, kth_largest, score_problem

__all__ = ["ImportanceShard", "ShardedImportanceEngine", "select_top_sharded", "sharded_importance"]


@dataclass
class ImportanceShard:
    """One process's slice of a parameter's importance: `values` (float32, 1-D) are the global flat entries
    [start, start + len(values)) of the parameter's `count` entries."""

    values: torch.Tensor
    start: int
    count: int


# --- the process group and its small collectives ------------------------------------------------------------------
class _Group:
    """Rank, size and the devices the backend can carry (gloo: CPU; nccl: the current GPU), with the few collectives
    pre-pruning uses. Small data travel on `small` and come back to the CPU."""

    def __init__(self, group: Any) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("Distributed pre-pruning needs an initialised torch.distributed process group.")
        self.group = group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        backend = str(dist.get_backend(group)).lower()
        self.plain = backend in ("gloo", "mpi")  # host backends: accelerator tensors go through the CPU
        self.cpu_ok = self.plain or "cpu:" in backend
        self.small = torch.device("cpu") if self.cpu_ok else self._accelerator()

    @staticmethod
    def _accelerator() -> torch.device:
        accelerator = getattr(torch, "accelerator", None)
        if accelerator is not None and accelerator.is_available():
            return torch.device(accelerator.current_accelerator().type, accelerator.current_device_index())
        return torch.device("cuda", torch.cuda.current_device())

    def carrier(self, device: torch.device) -> torch.device:
        """Where a tensor living on `device` is reduced: on its own device when the backend carries it."""
        if device.type == "cpu":
            return device if self.cpu_ok else self.small
        return torch.device("cpu") if self.plain else device

    def exchange(self, value: Any) -> list[Any]:
        """Every process's (small, picklable) `value`, in rank order."""
        values: list[Any] = [None] * self.size
        dist.all_gather_object(values, value, group=self.group)
        return values

    def all_reduce(self, tensor: torch.Tensor, op: Any = None) -> torch.Tensor:
        moved = tensor.to(self.small, copy=True)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM if op is None else op, group=self.group)
        return moved.to(tensor.device)

    def gather_rows(self, row: torch.Tensor) -> torch.Tensor:
        """[size, *row.shape]: every process's equally shaped `row`, on the CPU."""
        moved = row.to(self.small)
        out = [torch.empty_like(moved) for _ in range(self.size)]
        dist.all_gather(out, moved, group=self.group)
        return torch.stack(out).cpu()

    def gather_lengths(self, local: torch.Tensor, lengths: Sequence[int]) -> list[torch.Tensor]:
        """Every process's 1-D `local`, whose lengths all processes already know: padded to the longest, gathered."""
        width = max(lengths)
        padded = torch.zeros(width, dtype=local.dtype, device=self.small)
        padded[: local.numel()] = local.to(self.small)
        out = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(out, padded, group=self.group)
        return [o[:n].cpu() for o, n in zip(out, lengths)]

    def reduce_scatter(self, flat: torch.Tensor) -> torch.Tensor:
        """This process's 1/size of the sum over processes of `flat` (its length a multiple of size)."""
        carrier = self.carrier(flat.device)
        source = flat.to(carrier)
        out = torch.empty(source.numel() // self.size, dtype=source.dtype, device=carrier)
        # reduce_scatter_single is reduce_scatter_tensor's new name (the old one warns in recent torch)
        reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        reduce_scatter(out, source, group=self.group)
        del source
        return out.to(flat.device)

    def settle(self, fingerprint: dict[str, Any], problem: Optional[Exception] = None) -> None:
        """Raise on every process together: when the processes disagree on `fingerprint` (what they were asked to do,
        by field), or when any of them found a `problem`."""
        mine = None if problem is None else (type(problem).__name__, str(problem))
        everyone = self.exchange((fingerprint, mine))
        first = everyone[0][0]
        for rank, (theirs, _) in enumerate(everyone):
            fields = [key for key in first if theirs.get(key) != first[key]]
            if fields:
                raise ValueError(
                    f"Distributed pre-pruning needs the same arguments on every process, but process {rank} (of "
                    f"{self.size}) has other {', '.join(fields)} than process 0: call it with the same arguments and "
                    "rows everywhere."
                )
        for rank, (_, found) in enumerate(everyone):
            if found is not None:
                kind = TypeError if found[0] == "TypeError" else ValueError
                raise kind(f"{found[1]} (found on process {rank} of {self.size})")


def _digest(value: Any) -> str:
    return hashlib.sha256(repr(value).encode()).hexdigest()


# --- importance -----------------------------------------------------------------------------------------------------
class ShardedImportanceEngine(ImportanceEngine):
    """The importance engine with each accumulator a view into a flat float32 buffer padded to
    shard_chunk(count, world_size) * world_size entries (in `padded`), so it is reduce-scattered without a copy."""

    def __init__(self, model: nn.Module, selection: Selection, world_size: int) -> None:
        self.world_size = world_size
        self.padded: dict[str, torch.Tensor] = {}
        super().__init__(model, selection)

    def new_accumulator(self, name: str, shape: torch.Size, device: torch.device) -> torch.Tensor:
        count = shape.numel()
        flat = torch.zeros(shard_chunk(count, self.world_size) * self.world_size, dtype=torch.float32, device=device)
        self.padded[name] = flat
        return flat[:count].view(shape)


@torch.no_grad()
def sharded_importance(
    base_model: nn.Module,
    selection: Selection,
    batches: Sequence[Sequence[Mapping[str, Any]]],
    collator: Any,
    kind: str,
    aggregate: str = "mean",
    feature_classes: Optional[Sequence[str]] = None,
    group: Any = None,
) -> dict[str, ImportanceShard]:
    """This process's slices of pruning.importance(...) over ALL `batches` (every process passes the same ones): it
    accumulates weight/total * gradient of batches i % N == rank (weights and total over all batches, as in one
    process), then each parameter's accumulator is reduce-scattered and freed before the next, and the slice made
    absolute. Returns {name: ImportanceShard} in selection order."""
    g = _Group(group)
    names = list(selection.names)
    counts = {n: selection.entry_shape(n).numel() for n in names}
    fingerprint = {"rows": _digest(batches), "kind": kind, "aggregate": aggregate,
                   "feature classes": _digest(feature_classes), "selected entries": _digest(list(counts.items()))}
    g.settle(fingerprint)
    weights, total = importance_weights(batches, kind, aggregate, feature_classes)  # same on every process
    engine = ShardedImportanceEngine(base_model, selection, g.size)
    accumulate_batches(engine, batches, weights, total, collator, kind, aggregate, rank=g.rank, world_size=g.size)
    shards = {}
    for name in list(engine.accumulators):  # every process in the same (selection) order
        del engine.accumulators[name]
        flat = engine.padded.pop(name)
        start, end = shard_bounds(counts[name], g.rank, g.size)
        mine = g.reduce_scatter(flat)
        del flat  # the raw full-size accumulator goes before the next parameter is reduced
        shards[name] = ImportanceShard(mine[: end - start].abs_(), start, counts[name])
    return shards


# --- exact global top-k over the slices -----------------------------------------------------------------------------
def _local_count(values: torch.Tensor, op: Callable, cut: float) -> int:
    return sum(int(torch.count_nonzero(op(chunk, cut))) for _, chunk in chunks(values))


def _layout_problem(shards: Mapping[str, ImportanceShard], rank: int, size: int) -> Optional[Exception]:
    for name, shard in shards.items():
        if not isinstance(shard, ImportanceShard):
            return TypeError(f"shards[{name!r}] must be an ImportanceShard, got {type(shard).__name__}.")
        expected = shard_bounds(shard.count, rank, size)
        if (shard.start, shard.start + shard.values.numel()) != expected:
            return ValueError(
                f"The slice of {name} on process {rank} covers [{shard.start}, {shard.start + shard.values.numel()}) "
                f"of {shard.count} entries; the layout (shards.shard_bounds) gives [{expected[0]}, {expected[1]})."
            )
    return None


def select_top_sharded(
    shards: dict[str, ImportanceShard],
    keep: Optional[Keep] = None,
    *,
    threshold: Optional[float] = None,
    release: bool = False,
    group: Any = None,
) -> tuple[dict[str, Optional[torch.Tensor]], dict[str, Any]]:
    """pruning.select_top over scores that lie in slices on the processes (shards.shard_bounds layout): every process
    passes its slices of the same parameters and gets the same result as select_top on the whole scores, namely
    ({name: sorted global flat positions (int64) or None when all are kept}, info), parameters keeping nothing left
    out, ties at the cut to the earlier (parameter, flat index). `release=True` drops each slice once its positions
    are known. Only histograms, counts and the kept positions cross processes."""
    if (keep is None) == (threshold is None):
        raise ValueError("Give exactly one of keep= (a fraction or a count) and threshold= (a minimum importance).")
    g = _Group(group)
    names = list(shards)
    if not release:
        shards = dict(shards)
    problem = _layout_problem(shards, g.rank, g.size) or score_problem({n: s.values for n, s in shards.items()})
    fingerprint = {"parameters": _digest([(n, getattr(s, "count", None)) for n, s in shards.items()]),
                   "keep": repr(keep), "threshold": repr(threshold)}
    g.settle(fingerprint, problem)
    total = sum(s.count for s in shards.values())
    if total == 0:
        raise ValueError("There is nothing to prune: the score tensors are empty.")
    devices = {n: s.values.device for n, s in shards.items()}
    if threshold is not None:
        cut = float(torch.tensor(float(threshold), dtype=torch.float32))
        taken = g.gather_rows(torch.tensor([_local_count(shards[n].values, torch.ge, cut) for n in names]))
        k = int(taken.sum())
        if k == 0:
            local = max((float(s.values.max()) for s in shards.values() if s.values.numel()), default=-math.inf)
            largest = float(g.all_reduce(torch.tensor([local], dtype=torch.float64), dist.ReduceOp.MAX))
            raise ValueError(f"threshold={threshold!r} keeps no entry; the largest importance is {largest:.6g}.")

        def positions(values: torch.Tensor, _: int) -> torch.Tensor:
            return torch.cat([(chunk >= cut).nonzero().squeeze(1) + start for start, chunk in chunks(values)])

    else:
        k = keep_count(keep, total)
        if k == total:
            shards.clear()
            return {name: None for name in names}, {"kept": total, "total": total, "cutoff": 0.0}
        cut = kth_largest({n: s.values for n, s in shards.items()}, k, reduce=g.all_reduce)
        local = [_local_count(shards[n].values, op, cut) for op in (torch.gt, torch.eq) for n in names]
        both = g.gather_rows(torch.tensor(local, dtype=torch.long))  # [rank, (greater | equal) x parameter]
        greater, equal = both[:, : len(names)], both[:, len(names) :]
        # ties left after every greater entry, handed out in (parameter, rank) order = global flat order
        ties = k - int(greater.sum())
        flat_equal = equal.t().reshape(-1)
        before = flat_equal.cumsum(0) - flat_equal
        tied = (ties - before).clamp(min=0).minimum(flat_equal).reshape(len(names), g.size).t()
        taken = greater + tied

        def positions(values: torch.Tensor, p: int) -> torch.Tensor:
            parts, wanted = [], int(tied[g.rank, p])
            for start, chunk in chunks(values):
                parts.append((chunk > cut).nonzero().squeeze(1) + start)
                if wanted:
                    ties_here = (chunk == cut).nonzero().squeeze(1)[:wanted] + start
                    wanted -= ties_here.numel()
                    parts.append(ties_here)
            return torch.cat(parts).sort().values

    kept_counts = taken.sum(0).tolist()
    counts = [shards[n].count for n in names]
    partial = [p for p in range(len(names)) if 0 < kept_counts[p] < counts[p]]
    is_partial = set(partial)
    mine = []
    for p, name in enumerate(names):
        shard = shards.pop(name)
        if p in is_partial and int(taken[g.rank, p]):
            mine.append(positions(shard.values, p).cpu() + shard.start)
        del shard
    lengths = [int(taken[r, partial].sum()) for r in range(g.size)]
    everyone = (
        g.gather_lengths(torch.cat(mine) if mine else torch.zeros(0, dtype=torch.long), lengths)
        if partial and max(lengths)
        else []
    )
    pieces = {p: [] for p in partial}
    for r, flat in enumerate(everyone):
        sizes = [int(taken[r, p]) for p in partial]
        for p, piece in zip(partial, flat.split(sizes)):
            pieces[p].append(piece)
    kept: dict[str, Optional[torch.Tensor]] = {}
    for p, name in enumerate(names):
        if kept_counts[p] == counts[p]:  # everything (also an empty parameter, as select_top does)
            kept[name] = None
        elif p in pieces:
            kept[name] = torch.cat(pieces[p]).to(devices[name])  # sorted: slices are in rank order
    return kept, {"kept": k, "total": total, "cutoff": cut}
