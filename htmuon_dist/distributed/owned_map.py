"""Run a function on every whole matrix, on the matrix's owner only, with the optimizer's own
exchange plan: the same gathers as HTMuon's update, no scatter back, no rank holding the model.

Used by the training diagnostics (``--esd_steps``): the owner analyses each matrix it owns and
only small per-matrix results are all-gathered afterwards.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist


@torch.no_grad()
def map_owned(engine, pieces: Sequence[Optional[torch.Tensor]],
              fn: Callable[[int, torch.Tensor], Any]) -> dict[int, Any]:
    """Calls ``fn(i, W_i)`` on the owner of every matrix i and returns this rank's results.

    Collective over ``engine.group``: every rank must call it with the same matrices. Buckets go
    one at a time (gather, compute, free), so an owner holds at most one bucket of whole
    matrices, exactly as in the optimizer step.

    Args:
        engine: the optimizer's exchange engine (``opt.engine``), whose
            :meth:`~htmuon_dist.distributed.engine.ExchangeEngine.map_owned` does the walk.
        pieces: per matrix, this rank's flat piece of the tensor to analyse (numel = its range
            length; may be empty), or None to skip the matrix (must be None on every rank).
        fn: called with (matrix index, the whole matrix as a (m, n) float32 tensor on the
            pieces' device); its result should be small (it is pickled by :func:`all_results`).

    Returns:
        {matrix index: fn's result} for the matrices this rank owns.
    """
    return engine.map_owned(pieces, lambda i, whole: fn(i, whole.reshape(engine.shapes[i]).float()))


def all_results(local: dict[int, Any], group: Optional[dist.ProcessGroup] = None) -> dict[int, Any]:
    """Every rank's :func:`map_owned` results merged (one ``all_gather_object``; collective)."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return dict(local)
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, local, group=group)
    merged: dict[int, Any] = {}
    for part in gathered:
        merged.update(part)
    return merged


def optimizer_pieces(opt) -> tuple[list[str], list[torch.Tensor]]:
    """(names, this rank's flat weight pieces) of an HTMuon optimizer's matrices, in the order
    of its engine. Valid after the optimizer's first ``step()`` (the engine is built lazily)."""
    opt = getattr(opt, "optimizer", opt)  # Accelerate's AcceleratedOptimizer wraps it
    if getattr(opt, "engine", None) is None:
        raise RuntimeError("optimizer_pieces: the HTMuon engine is built at the first step(); call it after one step")
    mset = opt.matrix_sets[0]
    names = [e.name for e in mset.entries]
    pieces = [pl.local_view(e.param.to_local() if hasattr(e.param, "to_local") else e.param)
              for pl, e in zip(mset.placements, mset.entries)]
    return names, pieces
