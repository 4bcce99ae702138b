"""Owner assignment: which rank computes each matrix's spectral power.

The plan depends only on shapes, spectral specs, the world size and the (all-gathered) shard
ranges, so every rank computes it alone; the ranks compare a checksum instead of exchanging it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass(frozen=True)
class Plan:
    """Owners and exchange buckets for a list of matrices.

    Attributes:
        owners: per matrix, the rank that computes it.
        buckets: matrix indices per bucket, each in ascending order; one packed exchange each.
        loads: per rank, the summed cost of the matrices it owns.
    """

    owners: tuple[int, ...]
    buckets: tuple[tuple[int, ...], ...]
    loads: tuple[float, ...]

    @property
    def balance(self) -> float:
        """max/mean of per-rank cost (1.0 is perfect)."""
        mean = sum(self.loads) / max(len(self.loads), 1)
        return max(self.loads) / mean if mean > 0 else 1.0

    def checksum(self, extra: str = "") -> str:
        """A short digest of the plan (and ``extra``) for cross-rank agreement checks."""
        text = repr((self.owners, self.buckets)) + extra
        return hashlib.sha1(text.encode()).hexdigest()[:16]


def assign_owners(
    costs: Sequence[float],
    world_size: int,
    held: Optional[Sequence[Sequence[int]]] = None,
    locality_slack: float = 0.1,
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Greedy longest-processing-time: biggest matrix first, onto the least-loaded rank.

    Locality: when one rank holds more than half of a matrix (``held[i][r]`` elements; FSDP1
    and ZeRO put most matrices wholly inside one rank's partition) and its load is within
    ``locality_slack`` of an ideal rank's load of the least-loaded rank, that rank owns the
    matrix, so its piece never crosses the wire. Ties (equal cost, equal load) break by matrix
    index and then by lowest rank, so the result is deterministic.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    loads = [0.0] * world_size
    owners = [0] * len(costs)
    ideal = sum(costs) / world_size
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        if held is not None and world_size > 1:
            pieces = held[index]
            holder = max(range(world_size), key=lambda r: (pieces[r], -r))
            if 2 * pieces[holder] > sum(pieces) and loads[holder] <= loads[rank] + locality_slack * ideal:
                rank = holder
        owners[index] = rank
        loads[rank] += costs[index]
    return tuple(owners), tuple(loads)


def make_buckets(numels: Sequence[int], bucket_numel: int) -> tuple[tuple[int, ...], ...]:
    """Consecutive matrices into buckets of at most ``bucket_numel`` elements (at least one each)."""
    buckets: list[tuple[int, ...]] = []
    current: list[int] = []
    size = 0
    for index, numel in enumerate(numels):
        if current and size + numel > bucket_numel:
            buckets.append(tuple(current))
            current, size = [], 0
        current.append(index)
        size += numel
    if current:
        buckets.append(tuple(current))
    return tuple(buckets)


def make_plan(
    shapes: Sequence[tuple[int, int]],
    costs: Sequence[float],
    world_size: int,
    bucket_numel: int = 1 << 28,
    held: Optional[Sequence[Sequence[int]]] = None,
) -> Plan:
    """Plans owners (balanced on ``costs``, local where ``held`` allows) and buckets (by
    element count) for ``shapes``; ``held[i][r]`` = elements of matrix i on rank r."""
    if len(shapes) != len(costs):
        raise ValueError(f"{len(shapes)} shapes but {len(costs)} costs")
    owners, loads = assign_owners(costs, world_size, held)
    buckets = make_buckets([m * n for m, n in shapes], bucket_numel)
    return Plan(owners=owners, buckets=buckets, loads=loads)
