"""FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters are DTensors sharded by rows.

Supported placements: ``(Shard(0),)`` on a 1-D mesh; HSDP ``(Replicate(), Shard(0))``; FSDP2 x
tensor parallel ``(_StridedShard(0), Shard(0))`` (ColwiseParallel) and ``(Shard(0), Shard(1))``
(RowwiseParallel), with a leading ``Replicate()`` for HSDP x TP. A mesh of more than one dim
must span the whole world (the exchange then runs over all ranks, so replicas share the
spectral work instead of repeating it). Partial placements are refused naming the parameter.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..dtensor_ranges import local_flat_ranges, mesh_coordinates
from .common import MatrixPlacement, matrix_shape

try:  # torch >= 2.5 public location
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - older torch
    DTensor = None  # type: ignore[assignment]


def is_dtensor(t: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def _local_flat(t: torch.Tensor) -> torch.Tensor:
    local = t.to_local() if is_dtensor(t) else t
    return local.view(-1)


def describe(p: torch.Tensor, name: str) -> tuple[MatrixPlacement, dist.ProcessGroup]:
    """Placement and exchange group of a DTensor parameter ``p`` (global shape ``p.shape``).

    Every rank's piece comes from :func:`..dtensor_ranges.local_flat_ranges` (mesh shape,
    placements, global shape: no communication). When some rank's piece is several ranges
    (``Shard(1)`` under FSDP2 x TP), the placement lists every rank's ranges
    (``rank_ranges``) for :func:`..windowed.split_placement` to order on the wire.
    """
    shape = matrix_shape(p.shape, name)
    mesh, placements = p.device_mesh, p.placements
    # type() rather than isinstance: _StridedShard (FSDP2 + TP) subclasses Shard.
    unsupported = [pl for pl in placements
                   if not (isinstance(pl, Replicate) or type(pl) is Shard or type(pl).__name__ == "_StridedShard")]
    if unsupported:
        raise ValueError(
            f"{name}: DTensor placements {placements} are not supported by HTMuon (Shard, "
            f"_StridedShard and Replicate: FSDP2, HSDP, FSDP2 x tensor parallel); a Partial "
            f"placement means an unreduced gradient-like value, not a parameter"
        )
    local = p.to_local()
    group = _mesh_group(mesh, name)
    check_offload(local, group, name)
    if local.ndim and not local.is_contiguous():
        raise ValueError(f"{name}: the local shard is not contiguous; cannot address it flat")
    coords = mesh_coordinates(mesh.mesh.tolist())
    ranks = dist.get_process_group_ranks(group) if group is not dist.group.WORLD else range(dist.get_world_size())
    mesh_shape = tuple(mesh.mesh.shape)
    per_rank = tuple(tuple(local_flat_ranges(p.shape, mesh_shape, placements, coords[g])) for g in ranks)
    mine = per_rank[dist.get_rank(group)]
    if sum(b - a for a, b in mine) != local.numel():
        raise ValueError(
            f"{name}: placements {placements} on mesh {mesh_shape} should give this rank "
            f"{sum(b - a for a, b in mine)} elements, its local tensor has {local.numel()}; "
            f"this DTensor layout is not one htmuon-dist can address"
        )
    if all(len(r) <= 1 for r in per_rank):
        placement = MatrixPlacement(shape=shape, local_range=mine[0] if mine else (0, 0),
                                    local_view=_local_flat)
    else:
        placement = MatrixPlacement(shape=shape, local_range=(0, 0), local_view=_local_flat,
                                    rank_ranges=per_rank)
    return placement, group


# Backends that move CPU tensors; NCCL moves only GPU tensors.
_CPU_BACKENDS = ("gloo", "mpi", "ucc")


def backend_of(group: dist.ProcessGroup) -> str:
    """``dist.get_backend(group)`` (e.g. "nccl", "gloo", "cpu:gloo,cuda:nccl"); a seam for tests."""
    return str(dist.get_backend(group))


def check_offload(local: torch.Tensor, group: dist.ProcessGroup, name: str) -> None:
    """Refuses a shard on the CPU under a group that cannot move CPU tensors.

    FSDP2's ``CPUOffloadPolicy`` keeps sharded parameters and gradients on the CPU while the
    mesh's process group is NCCL; the exchange would hand CPU tensors to NCCL, which fails deep
    inside a collective (or hangs). Checked when the layouts are built, at the first step.
    """
    if local.device.type != "cpu":
        return
    backend = backend_of(group).lower()
    if any(b in backend for b in _CPU_BACKENDS):
        return
    raise ValueError(
        f"{name}: the FSDP2 shard lives on the CPU (fully_shard(..., offload_policy="
        f"CPUOffloadPolicy()) or a CPU model) but the mesh's process group is {backend!r}, which "
        f"cannot send CPU tensors; HTMuon does not support CPUOffloadPolicy with NCCL: drop "
        f"offload_policy (FSDP2 keeps shards on the GPU), or initialise the group with a CPU "
        f"backend too (init_process_group('cpu:gloo,cuda:nccl'); the exchange and Σ^p then run on the CPU)"
    )


def _mesh_group(mesh, name: str) -> dist.ProcessGroup:
    if mesh.ndim == 1:
        return mesh.get_group(0)
    if mesh.size() != dist.get_world_size():
        raise ValueError(
            f"{name}: a {mesh.ndim}-D device mesh of {mesh.size()} ranks inside a world of "
            f"{dist.get_world_size()}: HTMuon exchanges over the whole mesh and needs it to span "
            f"the world"
        )
    return dist.group.WORLD


def domains(p: torch.Tensor) -> "list[int] | None":
    """Per world rank, its HSDP replica group (the index along a leading ``Replicate()`` mesh
    dim), or None without one. A replica group holds every matrix whole, usually on one node,
    so owners gather from their own replica group first and nothing crosses nodes that the
    owner's node holds."""
    mesh = p.device_mesh
    if mesh.ndim < 2 or mesh.size() != dist.get_world_size() or not isinstance(p.placements[0], Replicate):
        return None
    out = [0] * dist.get_world_size()
    for rank, coord in mesh_coordinates(mesh.mesh.tolist()).items():
        out[rank] = coord[0]
    return out
