"""HTMuon state saved with torch.distributed.checkpoint at FSDP2 x TP (dp, tp) = (2, 2) loads at
another layout and continues exactly: 4 gloo ranks save after K steps; a fresh run at
(4, 1) (FSDP2 only), (1, 2) (TP only) or (2, 2) loads model and optimizer state and trains the
rest. Final parameters equal an uninterrupted single-process run to 2e-5 relative; the momentum
after the load equals the saved one (and the reference's). Loading the model without the
optimizer state must miss the reference (the test can tell)."""

from __future__ import annotations

import pytest
import torch

import tp_dcp_workers as tdw
from multirank import run_ranks

pytestmark = pytest.mark.multirank
K, STEPS, BATCH, TOL = 2, 4, 8, 2e-5


def _worst(got, want):
    assert set(got) == set(want)
    return max(float((got[n].double() - want[n].double()).norm() / want[n].double().norm()) for n in want)


@pytest.fixture(scope="module")
def want():
    return tdw.reference(STEPS, BATCH, K)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, want):
    ckpt = str(tmp_path_factory.mktemp("tp_dcp") / "ckpt")
    results = run_ranks(tdw.phase, 4, 2, 2, ckpt, False, (0, K), BATCH)
    for r in results:
        assert _worst(r["saved"], want["momentum"]) <= TOL
        assert all(torch.equal(r["saved"][n], results[0]["saved"][n]) for n in r["saved"])
    return ckpt, results[0]["saved"]


@pytest.mark.parametrize("dp,tp", [(4, 1), (1, 2), (2, 2)])
def test_tp_checkpoint_loads_at_another_layout(want, saved, dp, tp):
    ckpt, momentum = saved
    results = run_ranks(tdw.phase, dp * tp, dp, tp, ckpt, True, (K, STEPS), BATCH)
    for r in results:
        assert set(r["loaded"]) == set(momentum)
        for n in momentum:
            assert not torch.isnan(r["loaded"][n]).any(), n
            assert torch.equal(r["loaded"][n], momentum[n]), f"{n}: momentum changed by save/load"
        worst = _worst(r["params"], want["params"])
        print(f"saved at (2, 2), loaded at {(dp, tp)}: worst relative parameter error {worst:.2e}")
        assert worst <= TOL


def test_resume_without_optimizer_state_misses_reference(want, saved):
    ckpt, _ = saved
    results = run_ranks(tdw.phase, 4, 4, 1, ckpt, True, (K, STEPS), BATCH, False)
    worst = _worst(results[0]["params"], want["params"])
    print(f"model-only resume at (4, 1): worst relative parameter error {worst:.2e}")
    assert worst > 100 * TOL
