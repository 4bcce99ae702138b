"""DeepSpeed ZeRO stages 1, 2 and 3: the optimizer sees flat fp32 partitions, not matrices.

Under ZeRO, DeepSpeed replaces every param group's ``params`` with one flat 1-D fp32 tensor
(this rank's partition of the group, the master weights) and calls ``optimizer.step()`` once
per group (stages 1/2, and the BF16 optimizer that ZeRO-1 uses with bf16) or once per
sub-group (stage 3). The original parameters keep DeepSpeed's partition metadata, from which
this adapter reads, for each matrix of a flat partition, the rank's ``[start, end)`` range of
the flattened matrix and where that piece sits inside the flat partition:

- stages 1/2 and BF16: ``param._hp_mapping`` (``None`` where this rank holds none of it):
  ``lp_fragment_address`` is the range inside the matrix, ``hp_fragment_address`` the offset
  inside the flat partition; ``param._dp_group`` is the partition group.
- stage 3: every matrix is split evenly, ``partition_numel()`` elements per rank (the last rank
  padded), in the order of the sub-group ``param._z3_optimizer.fp16_groups[i]`` whose fp32
  partition is ``fp32_partitioned_groups_flat[i]``; ``param.ds_process_group`` is the group.

Each rank describes only its own pieces; the exchange engine all-gathers the ranges and checks
that they tile every matrix. No communication happens here.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from ...matrix_views import logical_shape
from .common import MatrixPlacement, matrix_shape

_OFFLOAD_MSG = (
    "HTMuon does not support DeepSpeed optimizer offload (zero_optimization.offload_optimizer): "
    "the spectral exchange needs the fp32 partitions on the accelerator. Remove offload_optimizer "
    "(parameter offload is fine at ZeRO-3 only if the optimizer states stay on the device)"
)


def is_zero_param(p: torch.Tensor) -> bool:
    """Whether DeepSpeed ZeRO (any stage) or its BF16 optimizer has taken ``p`` over."""
    return hasattr(p, "_hp_mapping") or hasattr(p, "_z3_optimizer") or hasattr(p, "ds_id")


def check_not_tagged(params: Sequence[torch.Tensor], names: Sequence[str]) -> None:
    """Refuses parameters tagged ``use_muon``: DeepSpeed's ZeRO-1/2 would then run its own
    Newton-Schulz on the gradient partitions of any optimizer whose class name contains "muon"
    (HTMuon's does), before HTMuon's step, and the result would be neither."""
    tagged = [n for p, n in zip(params, names) if getattr(p, "use_muon", False)]
    if tagged:
        raise ValueError(
            f"parameters {tagged[:3]}{'...' if len(tagged) > 3 else ''} carry DeepSpeed's "
            f"use_muon=True (set by an \"optimizer\": {{\"type\": \"Muon\"}} block in the DeepSpeed "
            f"config, or by hand). DeepSpeed would apply its own Newton-Schulz Muon to their "
            f"gradients before HTMuon sees them. Remove the optimizer block from the DeepSpeed "
            f"config (HTMuon is passed as the client optimizer) and do not set use_muon"
        )


def _zero3_subgroup(flat: torch.Tensor, p: torch.Tensor) -> list[torch.Tensor]:
    """The parameters whose partitions make up ``flat`` (one ZeRO-3 sub-group), in order."""
    zopt = p._z3_optimizer
    if getattr(zopt, "offload_optimizer", False):
        raise ValueError(_OFFLOAD_MSG)
    for index, candidate in enumerate(zopt.fp32_partitioned_groups_flat):
        if candidate is flat:
            return list(zopt.fp16_groups[index])
    raise ValueError(
        "HTMuon: a ZeRO-3 flat partition passed to step() is not one of DeepSpeed's "
        "fp32_partitioned_groups_flat; this DeepSpeed version lays out ZeRO-3 differently"
    )


def members_of_flat(
    flat: torch.Tensor, members: Sequence[tuple[torch.Tensor, str]]
) -> list[tuple[torch.Tensor, str]]:
    """Which of a param group's original ``(param, name)`` pairs live in ``flat``, in order.

    Stages 1/2: every parameter DeepSpeed linked (it leaves frozen and empty ones out, and
    ``_hp_mapping`` exists exactly on the linked ones). Stage 3: the sub-group of ``flat``.
    """
    linked = [(p, n) for p, n in members if hasattr(p, "_hp_mapping") or hasattr(p, "_z3_optimizer")]
    if not linked:
        return []
    first = linked[0][0]
    if hasattr(first, "_z3_optimizer"):
        order = {id(p): k for k, p in enumerate(_zero3_subgroup(flat, first))}
        chosen = [(p, n) for p, n in linked if id(p) in order]
        return sorted(chosen, key=lambda pn: order[id(pn[0])])
    return linked


def _view(offset: int, numel: int):
    def local_view(t: torch.Tensor) -> torch.Tensor:
        return t.view(-1).narrow(0, offset, numel)  # a view: writes land in the flat tensor

    return local_view


def _same_group(groups: list, name: str) -> Optional[dist.ProcessGroup]:
    distinct = {id(g): g for g in groups}
    if len(distinct) > 1:
        raise ValueError(
            f"{name}: the matrices of one DeepSpeed flat partition are partitioned over different "
            f"process groups; HTMuon needs one data-parallel group per param group"
        )
    return groups[0] if groups else None


def describe_flat(
    flat: torch.Tensor, members: Sequence[tuple[torch.Tensor, str]]
) -> tuple[list[MatrixPlacement], Optional[dist.ProcessGroup]]:
    """Placements of the matrices ``members`` (from :func:`members_of_flat`) inside ``flat``.

    Args:
        flat: this rank's flat fp32 partition (1-D) that DeepSpeed passed to ``step()``.
        members: the original parameters in ``flat`` and their names, the same list on every
            rank.

    Returns:
        one placement per member, whose ``local_view`` maps ``flat`` (or its grad, or a state
        tensor shaped like it) to this rank's piece of the matrix; and the partition group.

    Raises:
        ValueError: for optimizer offload or a layout that does not match ``flat``.
    """
    placements: list[MatrixPlacement] = []
    groups: list = []
    if flat.dim() != 1:
        raise ValueError(f"HTMuon expected DeepSpeed's flat 1-D partition, got shape {tuple(flat.shape)}")
    offset3 = 0
    for p, name in members:
        shape = matrix_shape(logical_shape(p), name)
        numel = shape[0] * shape[1]
        if hasattr(p, "_z3_optimizer"):  # stage 3: an even split of every matrix
            group = p.ds_process_group
            rank = dist.get_rank(group=group)
            per_rank = int(p.partition_numel())
            start = min(rank * per_rank, numel)
            end = min(start + per_rank, numel)
            offset, held = offset3, end - start
            offset3 += per_rank  # the last rank's padding stays in the flat partition, unused
        else:  # stages 1/2 and BF16: a fragment, or nothing
            group = p._dp_group
            mapping = p._hp_mapping
            if mapping is None:
                start = end = offset = held = 0
            else:
                if getattr(mapping, "use_offload", False):
                    raise ValueError(_OFFLOAD_MSG)
                start = int(mapping.lp_fragment_address.start)
                held = int(mapping.lp_fragment_address.numel)
                end = start + held
                offset = int(mapping.hp_fragment_address.start)
                frag = mapping.hp_fragment
                if frag.untyped_storage().data_ptr() != flat.untyped_storage().data_ptr():
                    raise ValueError(
                        f"{name}: DeepSpeed's fp32 fragment of this matrix is not inside the flat "
                        f"partition passed to step(); the param group and its flat partition disagree"
                    )
        if offset + held > flat.numel():
            raise ValueError(
                f"{name}: piece [{offset}, {offset + held}) lies outside the {flat.numel()}-element "
                f"flat partition"
            )
        groups.append(group)
        placements.append(MatrixPlacement(shape=shape, local_range=(start, end), local_view=_view(offset, held)))
    group = _same_group(groups, members[0][1] if members else "")
    if group is None and dist.is_available() and dist.is_initialized():
        group = dist.group.WORLD
    return placements, group
