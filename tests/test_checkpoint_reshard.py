"""HTMuon state saved with torch.distributed.checkpoint at W ranks loads at W' ranks (FSDP2).

The momentum buffers are DTensors placed like their parameters, so DCP reshards them; the run
that stops, saves at W, loads at W' and continues must equal an uninterrupted single-process
run to 1e-5 relative.
"""

from __future__ import annotations

import pytest
import torch

from dist_models import build, full_state, loss_fn, wrap
from htmuon_dist import HTMuon, param_groups
from multirank import run_ranks
from test_distributed import OPT, assert_same_params

pytestmark = pytest.mark.multirank

GLOBAL_BATCH = 12  # divisible by 2, 3 and 4


def batches(steps, offset=0):
    g = torch.Generator().manual_seed(123)
    all_batches = [torch.randint(0, 128, (GLOBAL_BATCH, 12), generator=g) for _ in range(offset + steps)]
    return all_batches[offset:]


def reference(total_steps):
    model = build("llama")
    opt = HTMuon(param_groups(model, "reference"), process_group=None, **OPT)
    for x in batches(total_steps):
        loss_fn("llama", model, x).backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def phase_worker(rank, world, ckpt, load, steps, offset, opt_kwargs=OPT, report=None):
    """Trains ``steps`` steps of the global batch stream from ``offset`` at ``world`` ranks, after
    loading ``ckpt`` (``load``) or before saving it. Returns the whole parameters and, with a
    module-level ``report(opt)``, its value after the load ("loaded") and at the end ("final")."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = build("llama", seed=99 if load else 0)  # a loaded run must not depend on its init
    wrap(model, "llama", "fsdp2")
    opt = HTMuon(param_groups(model, "reference"), **opt_kwargs)
    if load:
        model_sd, optim_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=ckpt)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    loaded = report(opt) if report is not None else None
    per_rank = GLOBAL_BATCH // world
    for x in batches(steps, offset):
        loss_fn("llama", model, x[rank * per_rank : (rank + 1) * per_rank]).backward()
        opt.step()
        opt.zero_grad()
    if not load:
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt)
    final = report(opt) if report is not None else None
    return {"params": full_state(model, "fsdp2"), "loaded": loaded, "final": final}


@pytest.mark.parametrize("w_save,w_load", [(4, 2), (2, 3)])
def test_save_at_w_load_at_w_prime_continues_exactly(tmp_path, w_save, w_load):
    ckpt = str(tmp_path / "ckpt")
    run_ranks(phase_worker, w_save, ckpt, False, 2, 0)
    results = run_ranks(phase_worker, w_load, ckpt, True, 2, 2)
    want = reference(4)
    for r in results:
        assert_same_params(r["params"], want)
