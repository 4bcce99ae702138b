"""Building matrix sets from HTMuon's param groups: which matrices the groups hold (a DeepSpeed
ZeRO flat partition holds several), their layouts, windows (experts, row blocks) and engine.

Runs at a set's first step on every rank (``describe_params`` may be collective); the
optimizer facade caches the result by :func:`set_key`.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from ..matrix_views import logical_shape, matrix_windows
from ..spectral import get_method
from .backends import describe_params, zero
from .engine import ExchangeEngine, SpectralSpec
from .matrix_set import MatrixEntry, MatrixSet
from .windowed import split_placement

# What the interval variant runs between its exact steps: Muon's Newton-Schulz polar factor.
MUON_SPEC = SpectralSpec(power=0.0, method="ns5", rtol=None)

# (group dict, original params, names) per param group, as the optimizer keeps them.
Origin = tuple[dict, list[torch.Tensor], list[str]]


def spectral_spec(group: dict) -> SpectralSpec:
    """The spectral map an HTMuon group asks for."""
    return SpectralSpec(power=float(group["power"]), method=group["method"], rtol=group["rtol"])


def zero_members(group: dict, origin: Optional[Origin]) -> Optional[list[tuple[torch.Tensor, str]]]:
    """The original (param, name) pairs inside the group's DeepSpeed ZeRO flat partition, or
    None when the group holds ordinary parameters."""
    params = group["params"]
    if origin is None or len(params) != 1 or not origin[1]:
        return None
    flat, originals = params[0], origin[1]
    if any(flat is p for p in originals) or not any(zero.is_zero_param(p) for p in originals):
        return None
    zero.check_not_tagged(originals, origin[2])
    return zero.members_of_flat(flat, list(zip(originals, origin[2])))


def matrix_entries(param_groups: Sequence[dict], origins: Sequence[Origin]) -> list[MatrixEntry]:
    """The matrices of every HTMuon group, in group order (the same on every rank)."""
    out = []
    for g_index, group in enumerate(param_groups):
        if not group["htmuon"]:
            continue
        origin = next((o for o in origins if o[0] is group), None)
        members = zero_members(group, origin)
        if members is not None:  # one flat partition holding several matrices
            out.extend(MatrixEntry(group["params"][0], group, name, p) for p, name in members)
            continue
        names = group.get("param_names")
        for j, p in enumerate(group["params"]):
            name = names[j] if names else f"param_groups[{g_index}].params[{j}]"
            out.append(MatrixEntry(p, group, name, None))
    return out


def set_key(matrices: Sequence[MatrixEntry]) -> tuple:
    """What identifies a matrix set: its tensors, names and the settings its plan depends on."""
    return tuple((id(e.param), e.name, id(e.origin)) for e in matrices) + tuple(
        (e.group["power"], e.group["method"], e.group["rtol"], e.group["normuon"],
         e.group["stack_dims"], e.group["row_blocks"]) for e in matrices
    )


def build_matrix_set(matrices: list[MatrixEntry], *, fsdp1_registry: dict, process_group: Any,
                     comm_dtype: Optional[torch.dtype], bucket_numel: Optional[int],
                     keep_buffers: bool = False) -> MatrixSet:
    """The matrix set of these matrices: layouts from the backend, one engine matrix per
    window, and the engine with its plan (collective over the exchange group)."""
    described = describe_params([e.param for e in matrices], [e.name for e in matrices],
                                fsdp1_registry, process_group,
                                zero_origins=[e.origin for e in matrices])
    matrices, placements = _windows(matrices, described.placements, described.group, fsdp1_registry)
    engine = ExchangeEngine(
        shapes=[pl.shape for pl in placements],
        local_ranges=[pl.local_range for pl in placements],
        specs=[spectral_spec(e.group) for e in matrices],
        names=[e.name for e in matrices],
        group=described.group,
        comm_dtype=comm_dtype,
        bucket_numel=bucket_numel,
        domains=described.domains,
        row_state_numels=[pl.shape[0] if e.group["normuon"] else 0
                          for pl, e in zip(placements, matrices)],
        keep_buffers=keep_buffers,
    )
    return MatrixSet(matrices, placements, engine, described.backend)


def _windows(matrices: list[MatrixEntry], placements, group, fsdp1_registry: dict) -> tuple[list, list]:
    """Each parameter's placement cut into its matrix windows (``stack_dims``,
    ``row_blocks``): one engine matrix per expert / row block, named ``name[e].rows[a:b]``."""
    rank = dist.get_rank(group) if group is not None else 0
    out_m, out_p = [], []
    for e, placement in zip(matrices, placements):
        flat = fsdp1_registry.get(id(e.param))  # FSDP1 views are 1-D: the original shape
        shape = flat.shape if flat is not None else logical_shape(e.origin if e.origin is not None else e.param)
        windows = matrix_windows(shape, e.group["stack_dims"], e.group["row_blocks"], e.name)
        split = split_placement(placement, windows, rank, e.name)
        multi = any(not isinstance(pl.local_range[0], int) for pl in split)
        if multi and get_method(e.group["method"]).stateful:
            raise ValueError(
                f"{e.name}: method={e.group['method']!r} keeps state per matrix, which tensor-"
                f"parallel pieces cannot address yet; use a stateless method (eigh, gram32, ...)"
            )
        out_m.extend(MatrixEntry(e.param, e.group, e.name + w.label, e.origin) for w in windows)
        out_p.extend(split)
    return out_m, out_p
