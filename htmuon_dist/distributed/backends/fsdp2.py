"""FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters are DTensors sharded by rows.

Supported placements: ``(Shard(0),)`` on a 1-D mesh, and HSDP ``(Replicate(), Shard(0))`` on a
2-D mesh that spans the whole world (the exchange then runs over all ranks, so replicas share
the spectral work instead of repeating it). A shard on dim 1 (tensor parallel), a matrix sharded
over two mesh dimensions, strided or partial placements are refused naming the parameter.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

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
    """Placement and exchange group of a DTensor parameter ``p`` (global shape ``p.shape``)."""
    shape = matrix_shape(p.shape, name)
    mesh, placements = p.device_mesh, p.placements
    shard_dims = [i for i, pl in enumerate(placements) if not isinstance(pl, Replicate)]
    # type() rather than isinstance: _StridedShard (FSDP2 + TP) subclasses Shard.
    unsupported = [pl for pl in placements if not (isinstance(pl, Replicate) or type(pl) is Shard)]
    if unsupported:
        raise ValueError(
            f"{name}: DTensor placements {placements} are not supported by HTMuon (only "
            f"Shard(0) as FSDP2 places them, optionally with Replicate() for HSDP)"
        )
    if len(shard_dims) > 1 or any(placements[i].dim != 0 for i in shard_dims):
        raise ValueError(
            f"{name}: DTensor placements {placements} shard the matrix on dim 1 or over "
            f"several mesh dimensions (tensor parallel); HTMuon supports FSDP2's Shard(0) on one "
            f"mesh dimension only"
        )
    local = p.to_local()
    group = _mesh_group(mesh, name)
    check_offload(local, group, name)
    if local.ndim and not local.is_contiguous():
        raise ValueError(f"{name}: the local shard is not contiguous; cannot address it flat")
    if shard_dims:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local_shape, offset = compute_local_shape_and_global_offset(p.shape, mesh, placements)
        row_start, rows = int(offset[0]), int(local_shape[0])
    else:  # replicated DTensor: the whole matrix on every rank of the mesh
        row_start, rows = 0, shape[0]
    cols = shape[1]
    placement = MatrixPlacement(
        shape=shape,
        local_range=(row_start * cols, (row_start + rows) * cols),
        local_view=_local_flat,
    )
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
    """Per world rank, its HSDP replica group (the mesh's first dimension), or None for a 1-D
    mesh. A replica group holds every matrix whole, usually on one node, so owners gather
    from their own replica group first and nothing crosses nodes that the owner's node holds."""
    mesh = p.device_mesh
    if mesh.ndim != 2 or mesh.size() != dist.get_world_size():
        return None
    layout = mesh.mesh.reshape(mesh.mesh.shape[0], -1).tolist()
    out = [0] * dist.get_world_size()
    for replica, ranks in enumerate(layout):
        for rank in ranks:
            out[int(rank)] = replica
    return out
