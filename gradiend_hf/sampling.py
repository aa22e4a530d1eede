"""Batches that each hold ONE transition (factual_class -> alternative_class), alternating between transitions.

GRADIEND learns from the gradient of a whole batch towards one target direction, so a batch must not mix
directions; alternating the directions keeps the classes balanced over training. Every row is used exactly
once per epoch (the last batch of a transition may be smaller), and `set_epoch` reshuffles deterministically.
"""

from __future__ import annotations

import math
import random
from typing import Any, Hashable, Iterator, Sequence

from torch.utils.data import Sampler


class TransitionBatchSampler(Sampler[list[int]]):
    """Single-transition batches of row indices, round robin over the transitions (A->B, B->A, A->B, ...).

    Transitions rotate in order of first appearance; once one runs out, the others' remaining batches follow.
    Use it as `DataLoader(dataset, batch_sampler=sampler, collate_fn=...)`.
    """

    drop_last = False  # read by accelerate when it shards batch samplers

    def __init__(self, transitions: Sequence[tuple[str, str]], batch_size: int, seed: int = 0, shuffle: bool = True):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if len(transitions) == 0:
            raise ValueError("no rows: the transitions list is empty, so there is nothing to batch.")
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.groups: dict[Hashable, list[int]] = {}
        for index, transition in enumerate(transitions):
            self.groups.setdefault(tuple(transition), []).append(index)

    @classmethod
    def from_dataset(
        cls, dataset: Any, batch_size: int, seed: int = 0, shuffle: bool = True
    ) -> "TransitionBatchSampler":
        """A sampler over a dataset with `factual_class` / `alternative_class` columns (see `schema.prepare_rows`)."""
        names = getattr(dataset, "column_names", None) or []
        missing = [c for c in ("factual_class", "alternative_class") if c not in names]
        if missing:
            raise ValueError(f"the dataset lacks the column(s) {missing}; got {list(names)}. Run prepare_rows first.")
        cols = dataset.select_columns(["factual_class", "alternative_class"])[:]  # one read, not row by row
        transitions = list(zip(cols["factual_class"], cols["alternative_class"]))
        return cls(transitions, batch_size, seed=seed, shuffle=shuffle)

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle of this epoch (called by the HF Trainer / accelerate before each epoch)."""
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        """The batches of the current epoch, in yield order."""
        rng = random.Random(self.seed + self.epoch)
        chunked = []
        for indices in self.groups.values():
            order = list(indices)
            if self.shuffle:
                rng.shuffle(order)
            chunked.append([order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)])
        rounds = max(len(chunks) for chunks in chunked)
        return [chunks[r] for r in range(rounds) for chunks in chunked if r < len(chunks)]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches()

    def __len__(self) -> int:
        return sum(math.ceil(len(indices) / self.batch_size) for indices in self.groups.values())


class ProcessBatches(Sampler[list[int]]):
    """One process's share of a batch sampler's batches when several processes train: batch i goes to process
    i % num_processes, whole; the first batches repeat (whole) until every process has the same number.

    accelerate's own sharding would cut and refill a short last batch of a transition with rows of the next batches,
    mixing transitions in one gradient, and can leave the processes with different numbers of batches.
    """

    def __init__(self, batch_sampler: Any, num_processes: int, process_index: int) -> None:
        self.batch_sampler, self.num_processes, self.process_index = batch_sampler, num_processes, process_index

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return math.ceil(len(self.batch_sampler) / self.num_processes)

    def __iter__(self) -> Iterator[list[int]]:
        batches = list(self.batch_sampler)
        batches += [batches[i % len(batches)] for i in range(len(self) * self.num_processes - len(batches))]
        yield from batches[self.process_index :: self.num_processes]
