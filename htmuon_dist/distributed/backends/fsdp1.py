"""FSDP1 (``FullyShardedDataParallel(use_orig_params=True)``): each original parameter is a
1-D view of this rank's slice of a flat parameter, possibly empty with ``grad=None``.

The shapes and intra-parameter ranges are not on the views themselves, so the user registers
the wrapped model once: ``htmuon_dist.attach_fsdp1(optimizer, fsdp_model)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .common import MatrixPlacement, matrix_shape


@dataclass(frozen=True)
class FlatRange:
    """An original parameter inside an FSDP1 flat parameter, on this rank."""

    shape: tuple[int, ...]
    start: int  # [start, end) of the flattened original parameter held here
    end: int
    group: dist.ProcessGroup


def collect(model: nn.Module) -> dict[int, FlatRange]:
    """id(original parameter) -> its shape, local range and FSDP process group.

    Raises:
        ValueError: if the model was wrapped without ``use_orig_params=True``.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    registry: dict[int, FlatRange] = {}
    for module in FSDP.fsdp_modules(model):
        handle = getattr(module, "_handle", None)
        if handle is None:
            continue
        flat = handle.flat_param
        params = getattr(flat, "_params", None)
        if params is None:
            raise ValueError(
                "attach_fsdp1 needs FullyShardedDataParallel(..., use_orig_params=True) so that "
                "the optimizer sees the original parameters"
            )
        for param, shape, info in zip(params, flat._shapes, flat._shard_param_infos):
            if info.in_shard:
                start, end = int(info.intra_param_start_idx), int(info.intra_param_end_idx) + 1
            else:
                start = end = 0
            registry[id(param)] = FlatRange(tuple(shape), start, end, module.process_group)
    if not registry:
        raise ValueError("attach_fsdp1 found no FSDP1-wrapped parameters in the model")
    return registry


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1)


def describe(p: torch.Tensor, flat_range: FlatRange, name: str) -> tuple[MatrixPlacement, dist.ProcessGroup]:
    shape = matrix_shape(flat_range.shape, name)
    if p.numel() != flat_range.end - flat_range.start:
        raise ValueError(
            f"{name}: FSDP1 view holds {p.numel()} elements but its range is "
            f"[{flat_range.start}, {flat_range.end}); call attach_fsdp1 again after re-wrapping"
        )
    placement = MatrixPlacement(shape=shape, local_range=(flat_range.start, flat_range.end), local_view=_flat)
    return placement, flat_range.group
