"""ShardLayout: where each rank's piece of one matrix lives.

Every sharding backend reduces to the same picture: rank r holds the contiguous range
``ranges[r] = (start, end)`` of the row-major flattened matrix (FSDP2 ``Shard(0)`` holds whole
rows, FSDP1 and ZeRO hold arbitrary flat ranges, replicated training holds everything on every
rank). Ranges of different ranks are either disjoint or identical (replicas); together they
cover the matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

Range = tuple[int, int]


@dataclass(frozen=True)
class ShardLayout:
    """One matrix as seen by every rank of the exchange group.

    Attributes:
        shape: the global 2-D shape (rows, cols); 4-D conv weights are (out, in*kh*kw).
        ranges: per rank, ``[start, end)`` in ``matrix.view(-1)`` that the rank holds and needs
            back; an empty range ``(x, x)`` means the rank holds nothing of this matrix.
    """

    shape: tuple[int, int]
    ranges: tuple[Range, ...]

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def size_on(self, rank: int) -> int:
        start, end = self.ranges[rank]
        return end - start


def _subtract(piece: Range, covered: list[Range]) -> list[Range]:
    """Parts of ``piece`` not inside any interval of ``covered`` (sorted, disjoint)."""
    start, end = piece
    out: list[Range] = []
    for c_start, c_end in covered:
        if c_end <= start or c_start >= end:
            continue
        if c_start > start:
            out.append((start, c_start))
        start = max(start, c_end)
        if start >= end:
            break
    if start < end:
        out.append((start, end))
    return out


def _insert(covered: list[Range], piece: Range) -> None:
    covered.append(piece)
    covered.sort()


def gather_sources(
    layout: ShardLayout, owner: int, name: str = "matrix", domains: Optional[Sequence[int]] = None
) -> tuple[Range, ...]:
    """Which range each rank sends so that ``owner`` can assemble the whole matrix.

    The owner uses its own piece; every other rank contributes the part of its piece that no
    rank before it has contributed, in the order: owner, the ranks of the owner's locality
    domain (``domains[r]``, e.g. its HSDP replica group, usually its node), then the others,
    each by ascending rank. Replicas therefore send nothing, a fully replicated matrix needs no
    gather at all, and under HSDP nothing crosses domains that the owner's domain holds.

    Returns:
        per rank, the ``[start, end)`` range it sends to the owner (the owner's own entry is its
        local piece and is not sent).

    Raises:
        ValueError: if the pieces overlap partially or leave a hole, naming ``name``.
    """
    world = len(layout.ranges)
    covered: list[Range] = []
    sources: list[Range] = [(0, 0)] * world
    home = domains[owner] if domains is not None else None
    order = [owner] + sorted(
        (r for r in range(world) if r != owner),
        key=lambda r: (domains is not None and domains[r] != home, r),
    )
    for rank in order:
        piece = layout.ranges[rank]
        if piece[1] <= piece[0]:
            sources[rank] = (piece[0], piece[0])
            continue
        new = _subtract(piece, covered)
        if len(new) > 1:
            raise ValueError(
                f"{name}: rank {rank}'s piece {piece} partially overlaps another rank's piece; "
                f"htmuon-dist supports disjoint or identical (replicated) pieces only"
            )
        sources[rank] = new[0] if new else (piece[0], piece[0])
        if new:
            _insert(covered, new[0])
    total = sum(end - start for start, end in covered)
    if total != layout.numel:
        raise ValueError(
            f"{name}: the ranks' pieces {list(layout.ranges)} cover {total} of {layout.numel} "
            f"elements of the {layout.shape} matrix; every element must be held by some rank"
        )
    return tuple(sources)


def piece_sources(
    shape: tuple[int, int], pieces: Sequence[Sequence[Range]], owner: int, name: str = "matrix",
    domains: Optional[Sequence[int]] = None,
) -> tuple[tuple[Range, ...], ...]:
    """:func:`gather_sources` for pieces that are tuples of ranges (tensor-parallel pieces):
    per rank, the ranges it sends to ``owner``. Same order and rules, range by range."""
    world = len(pieces)
    numel = int(shape[0]) * int(shape[1])
    covered: list[Range] = []
    sources: list[tuple[Range, ...]] = [()] * world
    home = domains[owner] if domains is not None else None
    order = [owner] + sorted(
        (r for r in range(world) if r != owner),
        key=lambda r: (domains is not None and domains[r] != home, r),
    )
    for rank in order:
        sent: list[Range] = []
        for piece in pieces[rank]:
            if piece[1] <= piece[0]:
                continue
            new = _subtract(tuple(piece), covered)  # type: ignore[arg-type]
            if len(new) > 1:
                raise ValueError(
                    f"{name}: rank {rank}'s piece {tuple(piece)} partially overlaps another rank's "
                    f"piece; htmuon-dist supports disjoint or identical (replicated) pieces only"
                )
            if new:
                sent.append(new[0])
                _insert(covered, new[0])
        sources[rank] = tuple(sent)
    total = sum(end - start for start, end in covered)
    if total != numel:
        raise ValueError(
            f"{name}: the ranks' pieces {[tuple(p) for p in pieces]} cover {total} of {numel} "
            f"elements of the {tuple(shape)} matrix; every element must be held by some rank"
        )
    return tuple(sources)


def validate_ranges(shape: Sequence[int], ranges: Sequence[Range], name: str) -> None:
    """Checks that every range lies inside the matrix, with a message naming ``name``."""
    numel = int(shape[0]) * int(shape[1])
    for rank, (start, end) in enumerate(ranges):
        if not (0 <= start <= end <= numel):
            raise ValueError(
                f"{name}: rank {rank} reports range [{start}, {end}) outside the "
                f"{tuple(shape)} matrix of {numel} elements"
            )
