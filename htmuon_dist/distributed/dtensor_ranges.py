"""Which flat ``[start, end)`` ranges of a DTensor's global tensor each mesh rank holds.

FSDP2 alone gives every rank one row block (one flat range). With tensor parallelism a rank's
piece is a sub-grid of the global tensor: ``(_StridedShard(0), Shard(0))`` (FSDP2 over ``dp`` x
``ColwiseParallel`` over ``tp``) is still a row block, but ``(Shard(0), Shard(1))`` (FSDP2 x
``RowwiseParallel``) holds a column segment of each of its rows: one range per row. HSDP x TP
adds a ``Replicate()`` mesh dim in front. The functions here compute those ranges from the
mesh shape, the placements and the global shape alone (no communication, no tensor), so every
rank can compute every other rank's piece.

Semantics (checked against real DTensors in tests/test_dtensor_ranges.py): every sharding step
follows ``torch.chunk`` (chunks of ``ceil(L / n)``, the last ones short or empty), applied per
mesh dim from left to right, except that a ``_StridedShard`` on mesh dim i is applied after the
mesh dims right of i that shard the same tensor dim (FSDP2 shards the TP-local tensor:
"right-to-left" sharding, which is what ``_StridedShard`` records). The local tensor holds its
elements in row-major order of its sub-grid, so its flat order is the ascending order of the
returned ranges.
"""

from __future__ import annotations

from typing import Any, Sequence

Range = tuple[int, int]

__all__ = ["dim_intervals", "flat_ranges", "local_flat_ranges", "mesh_coordinates", "window_pieces"]


def _kind(placement: Any) -> str:
    name = type(placement).__name__
    if name == "Replicate":
        return "replicate"
    if name == "_StridedShard":
        return "strided"
    if name == "Shard":
        return "shard"
    return name


def _chunk(intervals: list[Range], parts: int, index: int) -> list[Range]:
    """The ``index``-th of ``parts`` ``torch.chunk`` pieces of the ordered positions that
    ``intervals`` (sorted, disjoint) list."""
    length = sum(b - a for a, b in intervals)
    size = -(-length // parts) if length else 0
    lo, hi = min(index * size, length), min((index + 1) * size, length)
    out: list[Range] = []
    pos = 0
    for a, b in intervals:
        n = b - a
        s, e = max(lo - pos, 0), min(hi - pos, n)
        if s < e:
            out.append((a + s, a + e))
        pos += n
    return out


def dim_intervals(
    shape: Sequence[int], mesh_shape: Sequence[int], placements: Sequence[Any], coordinate: Sequence[int]
) -> list[list[Range]]:
    """Per tensor dim, the sorted index intervals that the rank at mesh ``coordinate`` holds.

    Raises:
        ValueError: for placements other than Replicate, Shard and _StridedShard (Partial).
    """
    if not (len(mesh_shape) == len(placements) == len(coordinate)):
        raise ValueError(f"mesh {tuple(mesh_shape)}, placements {tuple(placements)} and coordinate "
                         f"{tuple(coordinate)} must have one entry per mesh dim")
    out: list[list[Range]] = [[(0, int(d))] for d in shape]
    kinds = [_kind(p) for p in placements]
    bad = [p for p, k in zip(placements, kinds) if k not in ("replicate", "shard", "strided")]
    if bad:
        raise ValueError(f"placements {tuple(placements)}: {bad} cannot be addressed as ranges "
                         f"(only Replicate, Shard and _StridedShard)")
    # a _StridedShard waits for the later mesh dims that shard the same tensor dim
    def key(i: int) -> float:
        if kinds[i] != "strided":
            return float(i)
        later = [q for q in range(i + 1, len(kinds))
                 if kinds[q] != "replicate" and placements[q].dim == placements[i].dim]
        return max(later, default=i) + 0.5

    order = sorted((i for i, k in enumerate(kinds) if k != "replicate"), key=key)
    for i in order:
        dim = placements[i].dim
        if not 0 <= dim < len(shape):
            raise ValueError(f"placement {placements[i]} shards dim {dim} of a {len(shape)}-D tensor")
        out[dim] = _chunk(out[dim], int(mesh_shape[i]), int(coordinate[i]))
    return out


def flat_ranges(shape: Sequence[int], intervals: Sequence[list[Range]]) -> list[Range]:
    """The sorted flat ranges of ``prod(shape)`` covered by the sub-grid ``intervals`` (per dim),
    adjacent ranges merged; ``[]`` when the sub-grid is empty."""
    ranges: list[Range] = [(0, 1)]
    inner = 1
    for d in range(len(shape) - 1, -1, -1):
        size = int(shape[d])
        if ranges == [(0, inner)]:
            ranges = [(a * inner, b * inner) for a, b in intervals[d] if b > a]
        else:
            ranges = [(i * inner + s, i * inner + e) for a, b in intervals[d] for i in range(a, b)
                      for s, e in ranges]
        inner *= size
        merged: list[Range] = []
        for a, b in ranges:
            if merged and merged[-1][1] == a:
                merged[-1] = (merged[-1][0], b)
            else:
                merged.append((a, b))
        ranges = merged
    return ranges


def local_flat_ranges(
    shape: Sequence[int], mesh_shape: Sequence[int], placements: Sequence[Any], coordinate: Sequence[int]
) -> list[Range]:
    """The flat ranges of the global tensor that the rank at ``coordinate`` holds, in the order
    of its local tensor's flat view."""
    return flat_ranges(shape, dim_intervals(shape, mesh_shape, placements, coordinate))


def mesh_coordinates(mesh_ranks: Sequence) -> dict[int, tuple[int, ...]]:
    """``{global rank: coordinate}`` for a nested list of ranks (``DeviceMesh.mesh.tolist()``)."""
    out: dict[int, tuple[int, ...]] = {}

    def walk(node, prefix):
        if isinstance(node, (list, tuple)):
            for i, child in enumerate(node):
                walk(child, prefix + (i,))
        else:
            out[int(node)] = prefix

    walk(mesh_ranks, ())
    return out


def window_pieces(ranges: Sequence[Range], offset: int, numel: int) -> tuple[list[Range], Range]:
    """The part of a rank's flat ``ranges`` inside the window ``[offset, offset + numel)``.

    Returns:
        (the pieces relative to the window, in local order; ``[lo, hi)``: where they sit in the
        rank's local flat tensor).

    A window is one interval, so it takes the tail of its first range, whole ranges and the
    head of its last: its part of the local tensor is one contiguous slice (asserted).
    """
    pieces: list[Range] = []
    local_positions: list[Range] = []
    pos = 0
    for a, b in ranges:
        s, e = max(a, offset), min(b, offset + numel)
        if s < e:
            pieces.append((s - offset, e - offset))
            local_positions.append((pos + s - a, pos + e - a))
        pos += b - a
    if not local_positions:
        # empty: place it where the window would start in local order (any empty slice works)
        before = sum(min(b, offset) - a for a, b in ranges if a < offset)
        return [], (before, before)
    for (_, e), (s, _) in zip(local_positions, local_positions[1:]):
        assert e == s, f"window [{offset}, {offset + numel}) over unsorted ranges {list(ranges)}"
    return pieces, (local_positions[0][0], local_positions[-1][1])
