"""What every backend adapter returns for one parameter."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch


def matrix_shape(shape: Sequence[int], name: str) -> tuple[int, int]:
    """The 2-D view HTMuon orthogonalises: (rows, cols) for a matrix, (out, in*kh*kw) for a
    conv weight. Refuses 0-D/1-D shapes naming the parameter."""
    if len(shape) < 2:
        raise ValueError(
            f"{name}: HTMuon needs a >= 2-D weight, got shape {tuple(shape)}; route it to AdamW "
            f"(param group with 'htmuon': False)"
        )
    return int(shape[0]), int(math.prod(shape[1:]))


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1)  # view, not reshape: a silent copy would drop the write-back


@dataclass
class MatrixPlacement:
    """One matrix parameter on this rank.

    Attributes:
        shape: the global 2-D shape.
        local_range: ``[start, end)`` of the flattened matrix held here, or a tuple of such
            ranges (ascending, in the local tensor's order) for a tensor-parallel piece.
        local_view: maps the parameter, its gradient or a state tensor shaped like it to a flat
            view (numel = end - start) of the piece held here; writes through the view land in
            the original tensor.
        rank_ranges: only for pieces that are not one range (tensor parallel): per rank of the
            exchange group, the flat ranges of the parameter it holds, in its local order
            (``local_range`` is then meaningless until :func:`..windowed.split_placement`
            cuts the parameter into matrix windows).
    """

    shape: tuple[int, int]
    local_range: tuple[int, int]
    local_view: Callable[[torch.Tensor], torch.Tensor]
    rank_ranges: Optional[tuple[tuple[tuple[int, int], ...], ...]] = None

    @classmethod
    def replicated(cls, shape: tuple[int, int]) -> "MatrixPlacement":
        return cls(shape=shape, local_range=(0, shape[0] * shape[1]), local_view=_whole)
