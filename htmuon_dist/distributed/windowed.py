"""A parameter's placement cut into its matrix windows (expert stacks, row blocks).

Every backend describes a parameter as this rank's part of ``param.view(-1)``: one flat range
(FSDP2 ``Shard(0)``, FSDP1, ZeRO, replicated) or, under tensor parallelism, a list of ranges
per rank. :func:`split_placement` turns that into one :class:`MatrixPlacement` per
:class:`~htmuon_dist.matrix_views.MatrixWindow`, so the engine sees each expert matrix or row
block as a matrix of its own (own owner, balanced like any other), and the elements of one
parameter still cross the wire once: the windows partition them.

For a multi-range piece (tensor parallel) each window's part on a rank is a tuple of
window-relative ranges, which the engine addresses directly; its part of the local tensor is
one contiguous slice (a window is one interval).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..matrix_views import MatrixWindow
from .backends.common import MatrixPlacement
from .dtensor_ranges import window_pieces

Range = tuple[int, int]


def _narrow(view: Callable[[torch.Tensor], torch.Tensor], lo: int, hi: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: view(t)[lo:hi]


def _single(placement: MatrixPlacement, w: MatrixWindow) -> MatrixPlacement:
    s, e = placement.local_range
    a, b = max(s, w.offset), min(e, w.offset + w.numel)
    if a >= b:  # nothing of this window here: an empty piece at the window's start
        a = b = min(max(s, w.offset), e)
        return MatrixPlacement(shape=w.shape, local_range=(0, 0), local_view=_narrow(placement.local_view, a - s, a - s))
    return MatrixPlacement(shape=w.shape, local_range=(a - w.offset, b - w.offset),
                           local_view=_narrow(placement.local_view, a - s, b - s))


def wire_layout(per_rank: Sequence[Sequence[Range]], numel: int, name: str) -> tuple[list[Range], list[Range]]:
    """Wire order of one window from every rank's parts of it (window-relative, local order).

    Returns:
        (the window's ranges in wire order, per rank its ``[start, end)`` in wire order).

    Raises:
        ValueError: naming ``name`` when pieces overlap without being identical, or leave holes.
    """
    order: list[Range] = []
    placed: dict[tuple, Range] = {}
    spans: list[Range] = []
    count = torch.zeros(numel, dtype=torch.int8) if numel <= (1 << 26) else None
    pos = 0
    for pieces in per_rank:
        key = tuple(pieces)
        if key in placed:
            spans.append(placed[key])
            continue
        size = sum(b - a for a, b in pieces)
        placed[key] = (pos, pos + size)
        spans.append(placed[key])
        order.extend(pieces)
        pos += size
        if count is not None:
            for a, b in pieces:
                count[a:b] += 1
    if pos != numel or (count is not None and not bool((count == 1).all())):
        raise ValueError(
            f"{name}: the ranks' pieces overlap partially or leave holes ({pos} distinct elements "
            f"of {numel}); htmuon-dist supports disjoint or identical (replicated) pieces only"
        )
    return order, spans


def split_placement(placement: MatrixPlacement, windows: Sequence[MatrixWindow], rank: int,
                    name: str = "param") -> list[MatrixPlacement]:
    """One placement per window of a parameter placed as ``placement`` on this ``rank``.

    A multi-range piece (tensor parallel) stays a tuple of window-relative ranges in
    ``local_range`` (the engine addresses such pieces directly); the ranks' pieces of each
    window are checked to be disjoint or identical and to cover it."""
    if placement.rank_ranges is None:
        return [_single(placement, w) for w in windows]
    out = []
    for w in windows:
        parts = [window_pieces(r, w.offset, w.numel) for r in placement.rank_ranges]
        wire_layout([p for p, _ in parts], w.numel, f"{name}{w.label}")
        pieces, (lo, hi) = parts[rank]
        local_range = tuple(pieces) if len(pieces) > 1 else (pieces[0] if pieces else (0, 0))
        out.append(MatrixPlacement(shape=w.shape, local_range=local_range,  # type: ignore[arg-type]
                                   local_view=_narrow(placement.local_view, lo, hi)))
    return out
