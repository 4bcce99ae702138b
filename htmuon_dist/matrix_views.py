"""How one parameter splits into the independent matrices HTMuon orthogonalises.

A parameter holds one or more *matrix windows*: ``(flat offset, rows, cols)`` regions of
``param.view(-1)`` in row-major order, each orthogonalised on its own. Two per-group keys of
:class:`htmuon_dist.HTMuon` choose them (``param_groups`` sets both from the model):

- ``"stack_dims"``: how many leading dims index a stack of independent matrices. ``None``
  (default) decides by shape: a 3-D parameter (MoE expert tensors, ``(E, out, in)``) is a
  stack over dim 0; 2-D is one matrix; 4-D/5-D (conv weights) are one ``(out, in·kh·kw)``
  matrix. ``0`` forces one ``(d0, prod(rest))`` matrix (e.g. a Conv1d weight), ``k`` forces a
  stack over the first k dims, each matrix ``(d_k, prod(d_{k+1:}))``.
- ``"row_blocks"``: ``None`` or a tuple of row counts summing to the matrix's rows: each matrix
  (each matrix of a stack) is cut into consecutive row blocks, e.g. ``(I, I)`` for a fused
  gate/up projection, ``(q, k, v)`` for fused QKV, ``head_blocks(rows, head_dim)`` per head.

Pure functions over shapes; no tensors are touched.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

__all__ = ["MatrixWindow", "auto_stack_dims", "head_blocks", "logical_shape", "matrix_windows", "resolve_stack_dims"]


def logical_shape(p: torch.Tensor) -> tuple[int, ...]:
    """The parameter's real shape: under DeepSpeed ZeRO-3 (``zero.Init``) a partitioned
    parameter reports ``torch.Size([0])`` and keeps its shape in ``ds_shape``."""
    ds_shape = getattr(p, "ds_shape", None)
    return tuple(p.shape) if ds_shape is None else tuple(ds_shape)


@dataclass(frozen=True)
class MatrixWindow:
    """One independent matrix inside a parameter: ``param.view(-1)[offset : offset + rows·cols]``
    viewed as ``(rows, cols)``; ``label`` names it after the parameter (``"[3]"``: expert 3,
    ``"[3].rows[8:16]"``: its second row block)."""

    offset: int
    rows: int
    cols: int
    label: str = ""

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.cols


def auto_stack_dims(shape: Sequence[int]) -> int:
    """The shape-only default: 1 for a 3-D parameter (an expert stack), else 0 (a matrix, or a
    4-D/5-D conv weight viewed as ``(out, in·kh·kw)``). ``param_groups`` decides by module
    type instead (a Conv1d's 3-D weight gets 0) and writes the answer into the group."""
    return 1 if len(shape) == 3 else 0


def resolve_stack_dims(shape: Sequence[int], stack_dims: Optional[int], name: str = "param") -> int:
    """``stack_dims`` checked against ``shape`` (``None``: :func:`auto_stack_dims`).

    Raises:
        ValueError: naming ``name``, when fewer than two dims would remain for the matrix.
    """
    if stack_dims is None:
        return auto_stack_dims(shape)
    if isinstance(stack_dims, bool) or not isinstance(stack_dims, int) or not 0 <= stack_dims <= len(shape) - 2:
        raise ValueError(
            f"{name}: stack_dims={stack_dims!r} for shape {tuple(shape)}; it must be an int in "
            f"[0, {max(len(shape) - 2, 0)}] (leading dims that index independent matrices, at "
            f"least two dims left for the matrix) or None (decide by shape)"
        )
    return stack_dims


def head_blocks(rows: int, head_dim: int) -> tuple[int, ...]:
    """``row_blocks`` for per-head updates: ``rows / head_dim`` blocks of ``head_dim`` rows."""
    if head_dim <= 0 or rows % head_dim:
        raise ValueError(f"head_dim {head_dim} does not divide the projection's {rows} rows")
    return (head_dim,) * (rows // head_dim)


def matrix_windows(
    shape: Sequence[int],
    stack_dims: Optional[int] = None,
    row_blocks: Optional[Sequence[int]] = None,
    name: str = "param",
) -> list[MatrixWindow]:
    """The independent matrices of a parameter of global ``shape``, in flat order.

    Args:
        shape: the parameter's global shape (>= 2-D).
        stack_dims: see the module docstring (None: by shape).
        row_blocks: row counts of the consecutive blocks of every matrix (None: whole).
        name: for error messages.

    Returns:
        windows ordered by offset; they tile ``[0, prod(shape))`` exactly.

    Raises:
        ValueError: naming ``name``, for < 2-D shapes, a bad ``stack_dims`` or ``row_blocks``
            that do not sum to the matrix's rows.
    """
    shape = tuple(int(d) for d in shape)
    if len(shape) < 2:
        raise ValueError(f"{name}: HTMuon needs a >= 2-D weight, got shape {shape}; route it to AdamW "
                         f"(param group with 'htmuon': False)")
    k = resolve_stack_dims(shape, stack_dims, name)
    rows, cols = shape[k], math.prod(shape[k + 1:])
    if row_blocks is None:
        blocks: tuple[int, ...] = (rows,)
    else:
        blocks = tuple(int(b) for b in row_blocks)
        if not blocks or any(b <= 0 for b in blocks) or sum(blocks) != rows:
            raise ValueError(
                f"{name}: row_blocks {list(blocks)} must be positive row counts summing to the "
                f"matrix's {rows} rows (shape {shape}, stack_dims={k})"
            )
    windows: list[MatrixWindow] = []
    for flat_index, lead in enumerate(itertools.product(*(range(d) for d in shape[:k]))):
        base = flat_index * rows * cols
        stack_label = "".join(f"[{i}]" for i in lead)
        start = 0
        for b in blocks:
            label = stack_label + (f".rows[{start}:{start + b}]" if len(blocks) > 1 else "")
            windows.append(MatrixWindow(offset=base + start * cols, rows=b, cols=cols, label=label))
            start += b
    return windows
