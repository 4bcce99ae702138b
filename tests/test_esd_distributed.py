"""ESD statistics computed distributed (each matrix on its owner, htmuon_dist.distributed.
owned_map) equal the single-process statistics of the same weights: FSDP2, FSDP1 and DDP at
W = 2 and 3 (gloo), with HTMuon's exchange plan and with AdamW (a plan built for the monitor)."""

from __future__ import annotations

import math

import pytest
import torch

from dist_models import build, full_state, loss_fn, make_batches, wrap
from htmuon_dist import HTMuon, attach_fsdp1, param_groups
from htmuon_dist.diagnostics import spectral_stats
from htmuon_dist.diagnostics.monitor import EsdMonitor, stats_row
from multirank import run_ranks

pytestmark = pytest.mark.multirank


def _one(rank, world, backend, optimizer):
    from htmuon_dist.distributed.owned_map import map_owned
    from htmuon_dist.training.optim import clean_name, matrix_names

    model = build("llama", 0)
    routed = matrix_names(model, "reference")  # before wrapping: FSDP1 flattens the shapes
    groups = param_groups(model, "reference")
    wrapped = wrap(model, "llama", backend)
    if optimizer == "htmuon":
        if backend == "fsdp2":
            groups = param_groups(model, "reference")
        opt = HTMuon(groups, lr=0.02)
        if backend == "fsdp1":
            attach_fsdp1(opt, wrapped)
    else:
        opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-2)
    x = make_batches("llama", 1, 1, 2 * world)[0][0]
    loss_fn("llama", wrapped, x[2 * rank: 2 * rank + 2]).backward()
    opt.step()
    monitor = EsdMonitor(opt, wrapped, routed, clean_name)
    row = monitor(1)
    engine, names, pieces = monitor._engine_and_pieces()
    seen = map_owned(engine, pieces, lambda i, W: tuple(W.shape))
    full = full_state(wrapped, backend)  # collective; only for the single-process reference
    return {"row": row, "names": names, "seen": seen, "owners": list(engine.plan.owners),
            "shapes": [tuple(s) for s in engine.shapes], "full": {n: full[n] for n in names}}


def _worker(rank, world, cases):
    # Several backends one after the other in the same gloo group: one spawn per world size.
    return [_one(rank, world, backend, optimizer) for backend, optimizer in cases]


# Every backend at W = 2 and 3, each once with HTMuon's exchange plan and once with AdamW's.
CASES = {2: [("fsdp2", "htmuon"), ("ddp", "adamw"), ("fsdp1", "htmuon")],
         3: [("fsdp2", "adamw"), ("ddp", "htmuon"), ("fsdp1", "adamw")]}


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_stats_equal_single_process(world):
    per_rank = run_ranks(_worker, world, CASES[world])
    for case, (backend, optimizer) in enumerate(CASES[world]):
        _check([r[case] for r in per_rank], f"{backend}/{optimizer} W={world}")


def _check(results, label):
    names = results[0]["names"]
    assert len(names) == 2 * 7 + 2  # 2 layers x (q, k, v, o, gate, up, down) + embedding + head
    # The single-process statistics of the very same weights (rank 0's full copy).
    reference = stats_row(1, names, {i: spectral_stats(results[0]["full"][n]).as_dict() for i, n in enumerate(names)})
    for r, res in enumerate(results):
        assert res["names"] == names
        row = {k: v for k, v in res["row"].items() if k != "esd_seconds"}
        assert row.keys() == reference.keys()
        for key, want in reference.items():
            got = row[key]
            if isinstance(want, float) and math.isfinite(want):
                assert got == pytest.approx(want, rel=1e-9, abs=1e-12), (label, r, key)
            else:
                assert got == want, (label, r, key)
        # Each rank analysed exactly the matrices it owns, whole, and not the whole model.
        owned = {i for i, o in enumerate(res["owners"]) if o == r}
        assert set(res["seen"]) == owned
        assert all(res["seen"][i] == res["shapes"][i] for i in owned)
        assert len(owned) < len(names)
    assert set().union(*[set(res["seen"]) for res in results]) == set(range(len(names)))
    assert "esd_alpha_mean" in results[0]["row"] and "esd_alpha/q" in results[0]["row"]
