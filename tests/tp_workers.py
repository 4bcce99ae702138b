"""FSDP2 x tensor-parallel models and rank functions for the multi-rank tests (gloo, CPU).

A model with a column-parallel and a row-parallel linear of odd sizes, sharded over a
``(dp, tp)`` mesh (``parallelize_module`` over ``tp``, then ``fully_shard`` over ``dp``), or an
HSDP x TP ``(replicate, shard, tp)`` mesh. Importable by spawned ranks.
"""

from __future__ import annotations

import torch
from torch import nn

HIDDEN, FFN, QKV = 7, 11, 13
# Training needs TP-divisible feature dims (DTensor's ops refuse uneven TP matmuls); the
# FSDP2 shards of them are still uneven: 10 / 2 = 5 rows over dp = 2, 7 rows over dp = 2.
TRAIN_FFN, TRAIN_QKV = 10, 14


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


def build(seed: int = 0, train: bool = False) -> TPBlock:
    torch.manual_seed(seed)
    return TPBlock(HIDDEN, TRAIN_FFN, TRAIN_QKV) if train else TPBlock()


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


OPT = dict(lr=0.02, power=0.125, weight_decay=0.1)
ROW_BLOCKS = {"qkv.weight": (6, 4, 4), "out.weight": (3, 4)}  # blocks across TP pieces


def groups_of(model: nn.Module) -> list[dict]:
    """One HTMuon group per parameter; qkv and out cut into row blocks (windows over TP pieces)."""
    return [{"params": [p], "param_names": [n], "htmuon": True,
             **({"row_blocks": ROW_BLOCKS[n]} if n in ROW_BLOCKS else {})}
            for n, p in model.named_parameters()]


def batches(steps: int, global_batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(global_batch, HIDDEN, generator=g), torch.randn(global_batch, HIDDEN, generator=g))
            for _ in range(steps)]


def _train(model, opt, data, index: int = 0, parts: int = 1) -> None:
    per = data[0][0].shape[0] // parts
    for x, y in data:
        x, y = x[index * per:(index + 1) * per], y[index * per:(index + 1) * per]
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()


def reference(steps: int, global_batch: int, **opt_extra) -> dict[str, torch.Tensor]:
    from htmuon_dist import HTMuon

    model = build(train=True)
    _train(model, HTMuon(groups_of(model), **OPT, process_group=None, **opt_extra), batches(steps, global_batch))
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def full_params(model: nn.Module, mesh) -> dict[str, torch.Tensor]:
    """Every parameter assembled from all ranks' local values and their computed flat ranges
    (independent of ``full_tensor()``, which needs even shards for _StridedShard)."""
    import torch.distributed as dist
    from htmuon_dist.distributed.dtensor_ranges import local_flat_ranges, mesh_coordinates

    coords = mesh_coordinates(mesh.mesh.tolist())
    mine = {n: p.to_local().detach().reshape(-1).clone() for n, p in model.named_parameters()}
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    out = {}
    for n, p in model.named_parameters():
        flat = torch.full((p.numel(),), float("nan"))
        for rank, values in enumerate(gathered):
            ranges = local_flat_ranges(p.shape, tuple(mesh.mesh.shape), p.placements, coords[rank])
            pos = 0
            for a, b in ranges:
                flat[a:b] = values[n][pos:pos + b - a]
                pos += b - a
        out[n] = flat.view(p.shape)
    return out


def sharded_train(rank: int, world: int, dp: int, tp: int, replicas: int, steps: int, global_batch: int,
                  opt_extra: "dict | None" = None) -> dict:
    from htmuon_dist import HTMuon
    from htmuon_dist.distributed.dtensor_ranges import mesh_coordinates

    model = build(train=True)
    mesh = shard(model, dp, tp, replicas)
    coord = mesh_coordinates(mesh.mesh.tolist())[rank]
    data_index = coord[0] * dp + coord[1] if replicas > 1 else coord[0]
    opt = HTMuon(groups_of(model), **OPT, **(opt_extra or {}))
    _train(model, opt, batches(steps, global_batch), data_index, dp * replicas)
    engine = opt.engine
    return {"params": full_params(model, mesh), "owners": list(engine.plan.owners), "names": list(engine.names),
            "multi_range": [n for n, pcs in zip(engine.names, engine.pieces) if any(len(p) > 1 for p in pcs)],
            "placements": {n: str(p.placements) for n, p in model.named_parameters()},
            "sent": opt.comm_bytes_last_step}
