"""FSDP2 x tensor-parallel models and rank functions for the multi-rank tests (gloo, CPU).

A model with a column-parallel and a row-parallel linear of odd sizes, sharded over a
``(dp, tp)`` mesh (``parallelize_module`` over ``tp``, then ``fully_shard`` over ``dp``), or an
HSDP x TP ``(replicate, shard, tp)`` mesh. Importable by spawned ranks.
"""

from __future__ import annotations

import torch
from torch import nn

HIDDEN, FFN, QKV = 7, 11, 13


class TPBlock(nn.Module):
    """x -> down(silu(up(x)) * gate(x)) + out(qkv(x)): odd shapes, two colwise, two rowwise."""

    def __init__(self, hidden: int = HIDDEN, ffn: int = FFN, qkv: int = QKV) -> None:
        super().__init__()
        self.up = nn.Linear(hidden, ffn, bias=False)
        self.gate = nn.Linear(hidden, ffn, bias=False)
        self.down = nn.Linear(ffn, hidden, bias=False)
        self.qkv = nn.Linear(hidden, qkv, bias=False)
        self.out = nn.Linear(qkv, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.silu(self.up(x)) * self.gate(x)
        return self.down(h) + self.out(self.qkv(x))


TP_PLAN_NAMES = {"up": "colwise", "gate": "colwise", "qkv": "colwise", "down": "rowwise", "out": "rowwise"}


def build(seed: int = 0) -> TPBlock:
    torch.manual_seed(seed)
    return TPBlock()


def shard(model: nn.Module, dp: int, tp: int, replicas: int = 1):
    """Applies TP over ``tp`` then FSDP2 over the data-parallel dims; returns the mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    if replicas > 1:
        mesh = init_device_mesh("cpu", (replicas, dp, tp), mesh_dim_names=("rep", "dp", "tp"))
        dp_mesh = mesh["rep", "dp"]
    else:
        mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
        dp_mesh = mesh["dp"]
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    parallelize_module(model, mesh["tp"], {n: styles[s]() for n, s in TP_PLAN_NAMES.items()})
    fully_shard(model, mesh=dp_mesh)
    return mesh


def ranges_select_local(rank: int, world: int, dp: int, tp: int, replicas: int = 1) -> dict:
    """Per parameter: its placements and whether the computed flat ranges pick exactly this
    rank's local values out of the unsharded tensor."""
    from htmuon_dist.distributed.dtensor_ranges import local_flat_ranges, mesh_coordinates

    full = {n: p.detach().clone() for n, p in build().named_parameters()}
    model = build()
    mesh = shard(model, dp, tp, replicas)
    coord = mesh_coordinates(mesh.mesh.tolist())[rank]
    out = {}
    for name, p in model.named_parameters():
        ranges = local_flat_ranges(p.shape, tuple(mesh.mesh.shape), p.placements, coord)
        flat = full[name].reshape(-1)
        picked = torch.cat([flat[a:b] for a, b in ranges]) if ranges else flat[:0]
        local = p.to_local().reshape(-1)
        out[name] = (str(p.placements), len(ranges), picked.shape == local.shape and bool(torch.equal(picked, local)))
    return out
