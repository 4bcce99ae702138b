"""Backend adapters: for each optimizer parameter, the matrix's global 2-D shape, this rank's
flat range of it, and how to reach this rank's piece of any tensor shaped like the parameter.

Adapters hold no communication; :class:`htmuon_dist.distributed.engine.ExchangeEngine` does it
all. :func:`describe_params` detects the backend from the parameters themselves:
- a ``DTensor`` parameter (FSDP2 ``fully_shard``) -> :mod:`.fsdp2`;
- a parameter registered by :func:`htmuon_dist.attach_fsdp1` -> :mod:`.fsdp1`;
- a DeepSpeed ZeRO flat partition (the optimizer passes the original parameters it holds) ->
  :mod:`.zero`;
- anything else -> replicated: the whole matrix on every rank (one process, DDP).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from . import fsdp1, fsdp2, zero
from .common import MatrixPlacement, matrix_shape

__all__ = ["MatrixPlacement", "describe_params", "matrix_shape", "ParamLayouts"]


@dataclass
class ParamLayouts:
    """The result of :func:`describe_params` for the optimizer's matrix parameters."""

    placements: list[MatrixPlacement]
    group: Optional[dist.ProcessGroup]
    backend: str
    domains: Optional[list[int]] = None


def _default_group() -> Optional[dist.ProcessGroup]:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def describe_params(
    params: Sequence[torch.Tensor],
    names: Sequence[str],
    fsdp1_registry: Optional[dict[int, "fsdp1.FlatRange"]] = None,
    group: object = "auto",
    zero_origins: Optional[Sequence[Optional[torch.Tensor]]] = None,
) -> ParamLayouts:
    """Builds a placement for every matrix parameter and picks the exchange group.

    Args:
        params: the optimizer's matrix parameters (same order on every rank).
        names: their names, for error messages.
        fsdp1_registry: id(param) -> flat range, filled by :func:`htmuon_dist.attach_fsdp1`.
        group: "auto" (from the parameters: the FSDP2 mesh, the FSDP1 process group, or the
            world group for replicated parameters when torch.distributed is initialised),
            None (one process, no communication) or a process group.
        zero_origins: per entry, the original parameter when ``params[i]`` is a DeepSpeed ZeRO
            flat partition (the same flat repeats once per matrix it holds), else None.

    Raises:
        ValueError: for layouts the engine cannot express, naming the parameter.
    """
    placements: list[MatrixPlacement] = []
    groups: list[tuple[str, object]] = []
    backends: set[str] = set()
    registry = fsdp1_registry or {}
    origins = list(zero_origins) if zero_origins is not None else [None] * len(params)
    # ZeRO: one description per flat partition, covering the matrices it holds, in order.
    zero_members: dict[int, list[int]] = {}
    for index, p in enumerate(params):
        if origins[index] is not None:
            zero_members.setdefault(id(p), []).append(index)
    zero_placed: dict[int, tuple[MatrixPlacement, object]] = {}
    for indices in zero_members.values():
        flat = params[indices[0]]
        found, pgroup = zero.describe_flat(flat, [(origins[j], names[j]) for j in indices])
        zero_placed.update({j: (pl, pgroup) for j, pl in zip(indices, found)})
    for index, (p, name) in enumerate(zip(params, names)):
        if index in zero_placed:
            placement, pgroup = zero_placed[index]
            backends.add("zero")
        elif fsdp2.is_dtensor(p):
            placement, pgroup = fsdp2.describe(p, name)
            backends.add("fsdp2")
        elif id(p) in registry:
            placement, pgroup = fsdp1.describe(p, registry[id(p)], name)
            backends.add("fsdp1")
        else:
            placement, pgroup = MatrixPlacement.replicated(matrix_shape(p.shape, name)), None
            backends.add("replicated")
        placements.append(placement)
        if pgroup is not None:
            groups.append((name, pgroup))
    if group == "auto":
        distinct = {id(g): (n, g) for n, g in groups}
        if len(distinct) > 1:
            listed = ", ".join(n for n, _ in distinct.values())
            raise ValueError(
                "HTMuon parameters are sharded over different process groups (e.g. " + listed +
                "); put every matrix of one optimizer on one device mesh / FSDP process group"
            )
        chosen = next(iter(distinct.values()))[1] if distinct else _default_group()
    else:
        chosen = group
    if chosen is None and (backends - {"replicated"}):
        raise ValueError("sharded parameters need a process group; pass process_group='auto'")
    backend = "+".join(sorted(backends)) if backends else "replicated"
    domains = next((fsdp2.domains(p) for p in params if fsdp2.is_dtensor(p)), None)
    if chosen is not dist.group.WORLD:
        domains = None  # HSDP domains are world ranks; other groups have their own numbering
    return ParamLayouts(placements=placements, group=chosen, backend=backend,  # type: ignore[arg-type]
                        domains=domains)
