"""FSDP2 shards on the CPU under an NCCL group (``CPUOffloadPolicy``) are refused at the first
step with a message naming the policy.

No GPU or NCCL here, and ``fully_shard(offload_policy=CPUOffloadPolicy())`` itself needs an
accelerator, so the shards are CPU shards of a CPU model (what the policy leaves on the CPU
too), the group is gloo, and the backend query the check reads (``fsdp2.backend_of``) is
replaced by one answering "nccl". Everything else (FSDP2 parameters, the optimizer's first step
building the layouts) is the real code path.
"""

from __future__ import annotations

import pytest
import torch

from multirank import run_ranks

pytestmark = pytest.mark.multirank


def _worker(rank, world, answer):
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    from htmuon_dist import HTMuon
    from htmuon_dist.distributed.backends import fsdp2

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12, bias=False), nn.Linear(12, 4, bias=False))
    fully_shard(model)
    real = fsdp2.backend_of(fsdp2._mesh_group(model[0].weight.device_mesh, "x"))
    if answer is not None:
        fsdp2.backend_of = lambda group: answer
    opt = HTMuon(model.parameters(), lr=0.02)
    model(torch.randn(3, 8)).square().sum().backward()
    try:
        opt.step()
    except ValueError as e:
        return real, "error", str(e)
    return real, "ok", model[0].weight.to_local().abs().sum().item()


def test_cpu_shards_under_nccl_are_refused_at_the_first_step():
    real, status, msg = run_ranks(_worker, 2, "nccl")[0]
    assert real == "gloo"  # the query the check uses reads the real group
    assert status == "error"
    assert "CPUOffloadPolicy" in msg and "'nccl'" in msg and "params[0]" in msg


def test_cpu_shards_under_a_cpu_capable_group_step():
    # (plain gloo is every CPU FSDP2 test of tests/test_distributed.py)
    results = run_ranks(_worker, 2, "cpu:gloo,cuda:nccl")
    assert all(status == "ok" for _, status, _ in results)
