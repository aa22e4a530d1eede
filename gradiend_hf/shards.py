"""Which contiguous slice of a parameter's flat entries each process owns when the bottleneck is sharded.

The layout of torch.chunk and of DTensor's Shard placement: chunks of ceil(count / N) entries, the last ones shorter
or empty. Sharded training, distributed pre-pruning and distributed checkpoints all use it, so their slices agree.
"""

from __future__ import annotations


def shard_chunk(count: int, world_size: int) -> int:
    """Entries per rank before the end is reached: ceil(count / world_size)."""
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}.")
    return -(-count // world_size)


def shard_bounds(count: int, rank: int, world_size: int) -> tuple[int, int]:
    """(start, end) of the flat entries rank `rank` of `world_size` owns among `count`."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in 0..{world_size - 1}, got {rank}.")
    chunk = shard_chunk(count, world_size)
    start = min(rank * chunk, count)
    return start, min(start + chunk, count)
