"""Rank functions for saving HTMuon state with torch.distributed.checkpoint under FSDP2 x TP
and loading it at another (dp, tp) layout. Importable by spawned ranks (gloo, CPU).

Models, meshes, data and optimizer settings are those of ``tp_workers``; a run at (dp, tp)
feeds rank coordinate ``(i, j)`` the ``i``-th of ``dp`` slices of each global batch.
"""

from __future__ import annotations

import torch
from torch import nn

import tp_workers as tw


def _assemble(tensors: dict[str, torch.Tensor], mesh) -> dict[str, torch.Tensor]:
    """Whole tensors from every rank's local values of same-placed DTensors (``full_tensor``
    is wrong for uneven ``_StridedShard``); called on all ranks."""
    import torch.distributed as dist
    from htmuon_dist.distributed.dtensor_ranges import local_flat_ranges, mesh_coordinates

    coords = mesh_coordinates(mesh.mesh.tolist())
    mine = {n: t.to_local().detach().reshape(-1).clone() for n, t in tensors.items()}
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    out = {}
    for n, t in tensors.items():
        flat = torch.full((t.numel(),), float("nan"))
        for rank, values in enumerate(gathered):
            pos = 0
            for a, b in local_flat_ranges(t.shape, tuple(mesh.mesh.shape), t.placements, coords[rank]):
                flat[a:b] = values[n][pos:pos + b - a]
                pos += b - a
        out[n] = flat.view(t.shape)
    return out


def momenta(model: nn.Module, opt, mesh=None) -> dict[str, torch.Tensor]:
    """Every parameter's whole momentum buffer; single-process when ``mesh`` is None."""
    bufs = {n: opt.state[p]["momentum_buffer"] for n, p in model.named_parameters()}
    if mesh is None:
        return {n: b.detach().clone() for n, b in bufs.items()}
    placements = {n: (str(b.placements), str(p.placements)) for (n, b), p in zip(bufs.items(), model.parameters())}
    for n, (b, p) in placements.items():
        assert b == p, f"{n}: momentum placed {b}, parameter {p}"
    return _assemble(bufs, mesh)


def reference(steps: int, global_batch: int, stop: int) -> dict:
    """Uninterrupted single-process run: final parameters and the momentum after ``stop`` steps."""
    from htmuon_dist import HTMuon

    model = tw.build(train=True)
    opt = HTMuon(tw.groups_of(model), **tw.OPT, process_group=None)
    data = tw.batches(steps, global_batch)
    tw._train(model, opt, data[:stop])
    mid = momenta(model, opt)
    tw._train(model, opt, data[stop:])
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()}, "momentum": mid}


def phase(rank: int, world: int, dp: int, tp: int, ckpt: str, load: bool, steps: "tuple[int, int]",
          global_batch: int, load_optim: bool = True) -> dict:
    """Trains global steps ``steps[0]:steps[1]`` at (dp, tp): after loading ``ckpt`` (``load``;
    the optimizer state too unless ``load_optim`` is False) or before saving model and optimizer
    state to it. Returns the whole parameters at the end and the whole momentum after the load
    ("loaded") or at the save ("saved")."""
    import torch.distributed.checkpoint as dcp
    from htmuon_dist import HTMuon
    from htmuon_dist.distributed.dtensor_ranges import mesh_coordinates
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_model_state_dict, set_state_dict

    assert dp * tp == world
    model = tw.build(seed=99 if load else 0, train=True)  # a loaded run must not depend on its init
    mesh = tw.shard(model, dp, tp)
    opt = HTMuon(tw.groups_of(model), **tw.OPT)
    out: dict = {}
    if load:
        model_sd, optim_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": optim_sd} if load_optim else {"model": model_sd}
        dcp.load(state, checkpoint_id=ckpt)
        if load_optim:
            set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
            out["loaded"] = momenta(model, opt, mesh)
        else:
            set_model_state_dict(model, state["model"])
    data_index = mesh_coordinates(mesh.mesh.tolist())[rank][0]
    tw._train(model, opt, tw.batches(steps[1], global_batch)[steps[0]:], data_index, dp)
    if not load:
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt)
        out["saved"] = momenta(model, opt, mesh)
    out["params"] = tw.full_params(model, mesh)
    return out
