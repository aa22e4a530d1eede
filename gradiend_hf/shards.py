"""Which contiguous slice of a flat tensor each of several processes owns.

The layout is torch.chunk's (and DTensor's Shard(0)): slices of ceil(count / world_size) entries in rank order, the
last ones shorter or empty. Kept in a dependency-free module so every piece of code that splits tensors over processes
(pre-pruning's importance, sharded adapters, checkpoints) agrees on one layout.
"""

from __future__ import annotations

import numbers

__all__ = ["shard_bounds", "shard_chunk"]


def _check_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}.")


def shard_chunk(count: int, world_size: int) -> int:
    """Entries per slice, ceil(count / world_size): a flat tensor padded to shard_chunk * world_size entries splits
    into equal slices (what reduce_scatter / all_gather need)."""
    _check_int("count", count)
    _check_int("world_size", world_size)
    if count < 0:
        raise ValueError(f"count={count!r}: a number of entries cannot be negative.")
    if world_size < 1:
        raise ValueError(f"world_size={world_size!r}: there must be at least one process.")
    return -(-int(count) // int(world_size))


def shard_bounds(count: int, rank: int, world_size: int) -> tuple[int, int]:
    """(start, end) of the flat entries [start, end) that process `rank` of `world_size` owns out of `count`."""
    chunk = shard_chunk(count, world_size)
    _check_int("rank", rank)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank!r} is not a process of a world of {world_size} (0 <= rank < world_size).")
    return min(rank * chunk, count), min((rank + 1) * chunk, count)
