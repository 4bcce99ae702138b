"""Owner assignment and buckets: which rank computes each matrix, and which matrices are
exchanged together.

The plan depends only on shapes, spectral costs, the world size and the (all-gathered) shard
ranges, so every rank computes it alone; the ranks compare a checksum instead of exchanging it.

A bucket is one gather → compute → scatter round. Buckets are cut by *per-rank* memory, not
by index: on every rank, the elements it owns (whole matrices it assembles) plus the elements
it holds locally (its pieces, which it sends and receives back) stay within ``bucket_numel``.
Inside each bucket owners are chosen longest-processing-time first on the bucket's own load
(ties broken by the load over the whole step), so every bucket is balanced — the pipeline is
gated by each bucket's slowest rank — and so is the step.
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
        buckets: matrix indices per bucket, each in ascending order; one packed exchange each
            way. Buckets run in this order (largest cost first).
        loads: per rank, the summed cost of the matrices it owns.
        bucket_loads: per bucket, per rank, the summed cost it owns in that bucket.
    """

    owners: tuple[int, ...]
    buckets: tuple[tuple[int, ...], ...]
    loads: tuple[float, ...]
    bucket_loads: tuple[tuple[float, ...], ...] = ()

    @property
    def balance(self) -> float:
        """max/mean of per-rank cost over the step (1.0 is perfect)."""
        return _balance(self.loads)

    @property
    def pipeline_balance(self) -> float:
        """Sum over buckets of the slowest rank's cost, over the ideal sum/W (1.0 is perfect).

        The step takes about this many times the ideal time: a bucket finishes when its
        slowest owner does.
        """
        total = sum(self.loads)
        if total <= 0:
            return 1.0
        return sum(max(b) for b in self.bucket_loads) / (total / len(self.loads))

    def checksum(self, extra: str = "") -> str:
        """A short digest of the plan (and ``extra``) for cross-rank agreement checks."""
        text = repr((self.owners, self.buckets)) + extra
        return hashlib.sha1(text.encode()).hexdigest()[:16]


def _balance(loads: Sequence[float]) -> float:
    mean = sum(loads) / max(len(loads), 1)
    return max(loads) / mean if mean > 0 else 1.0


def default_bucket_numel(numels: Sequence[int]) -> int:
    """Twice the largest matrix (at least 2^22): room for the largest matrix owned whole plus
    its local piece, so it can sit alone in a bucket, and no bucket asks for more."""
    return max(2 * max(numels, default=0), 1 << 22)


def make_plan(
    shapes: Sequence[tuple[int, int]],
    costs: Sequence[float],
    world_size: int,
    bucket_numel: Optional[int] = None,
    held: Optional[Sequence[Sequence[int]]] = None,
    locality_slack: float = 0.5,
) -> Plan:
    """Plans owners and buckets for ``shapes``.

    Args:
        shapes: global (rows, cols) per matrix.
        costs: spectral cost per matrix (FLOPs); owners are balanced on it.
        world_size: ranks in the exchange group.
        bucket_numel: per-rank cap, in elements, on (owned whole matrices + local pieces) of
            one bucket; default :func:`default_bucket_numel`. A matrix larger than the cap
            gets a bucket of its own.
        held: ``held[i][r]`` = elements of matrix i held on rank r (default: even split).
        locality_slack: a rank holding more than half of a matrix owns it when its bucket load
            is within ``locality_slack`` times the matrix's cost of the least-loaded rank's
            (its piece then never crosses the wire).

    Deterministic: ties break by matrix index and then by lowest rank.
    """
    if len(shapes) != len(costs):
        raise ValueError(f"{len(shapes)} shapes but {len(costs)} costs")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    numels = [int(m) * int(n) for m, n in shapes]
    cap = default_bucket_numel(numels) if bucket_numel is None else int(bucket_numel)
    if cap < 1:
        raise ValueError(f"bucket_numel must be >= 1, got {bucket_numel}")
    if held is None:
        held = [[-(-k // world_size)] * world_size for k in numels]
    owners = [0] * len(shapes)
    loads = [0.0] * world_size
    buckets: list[tuple[int, ...]] = []
    bucket_loads: list[tuple[float, ...]] = []
    remaining = sorted(range(len(shapes)), key=lambda i: (-costs[i], i))
    while remaining:
        b_load = [0.0] * world_size
        b_mem = [0] * world_size
        members: list[int] = []
        leftover: list[int] = []
        for i in remaining:
            pieces = held[i]
            if not members:  # the first matrix of a bucket always fits
                candidates = list(range(world_size))
            elif all(b_mem[r] + pieces[r] <= cap for r in range(world_size)):
                candidates = [r for r in range(world_size) if b_mem[r] + pieces[r] + numels[i] <= cap]
            else:
                candidates = []
            if not candidates:
                leftover.append(i)
                continue
            best = min(candidates, key=lambda r: (b_load[r], loads[r], r))
            if world_size > 1:
                holder = max(range(world_size), key=lambda r: (pieces[r], -r))
                if (holder in candidates and 2 * pieces[holder] > sum(pieces)
                        and b_load[holder] <= b_load[best] + locality_slack * costs[i]):
                    best = holder
            owners[i] = best
            members.append(i)
            b_load[best] += costs[i]
            loads[best] += costs[i]
            for r in range(world_size):
                b_mem[r] += pieces[r] + (numels[i] if r == best else 0)
        buckets.append(tuple(sorted(members)))
        bucket_loads.append(tuple(b_load))
        remaining = leftover
    return Plan(owners=tuple(owners), buckets=tuple(buckets), loads=tuple(loads),
                bucket_loads=tuple(bucket_loads))
