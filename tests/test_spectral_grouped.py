"""spectral_power_groups: independent spectral_power calls, concurrently on CUDA streams.

On this CPU machine the CUDA path cannot run; what runs here: the CPU path (in order), the
lane plan, and the threaded lane runner the CUDA path uses (with no stream context), all
against the sequential calls. tests/test_gpu.py runs the CUDA path where a GPU is present.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from htmuon_dist.spectral import spectral_power
from htmuon_dist.spectral.grouped import (
    merge_batches,
    plan_lanes,
    run_lanes,
    spectral_power_groups,
    split_batches,
)


def _jobs():
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(3, 48, 32, generator=g), 0.125, "eigh", None),
        (torch.randn(32, 80, generator=g), 0.125, "eigh", None),  # wide, unbatched
        (torch.randn(2, 40, 40, generator=g, dtype=torch.float64), 0.3, "svd", 1e-10),
        (torch.randn(64, 24, generator=g).bfloat16(), 0.0, "ns5", None),
        (torch.randn(2, 56, 32, generator=g), 0.125, "tracked_ns", None),
    ]


def _sequential(jobs):
    return [spectral_power(x, p, method=m, rtol=r) for x, p, m, r in jobs]


def test_cpu_groups_equal_the_sequential_calls():
    jobs = _jobs()
    got = spectral_power_groups(jobs)
    want = _sequential(jobs)
    assert len(got) == len(want)
    for g, w, (x, *_r) in zip(got, want, jobs):
        assert g.shape == x.shape and g.dtype == x.dtype
        assert torch.equal(g, w)
    assert spectral_power_groups([]) == []


@pytest.mark.parametrize("lanes", [1, 2, 3, 8])
def test_threaded_lanes_equal_the_sequential_calls(lanes):
    """The CUDA path's runner (threads, per-lane order, reassembly by job index) on the CPU."""
    jobs = _jobs()
    plan = plan_lanes(jobs, lanes)
    assert sorted(i for lane in plan for i in lane) == list(range(len(jobs)))
    assert len(plan) == min(lanes, len(jobs))
    seen = []
    got = run_lanes(jobs, plan, lambda k: contextlib.nullcontext(), after=lambda k, out: seen.append(k))
    assert sorted(seen) == sorted(k for k, lane in enumerate(plan) for _ in lane)
    for g, w in zip(got, _sequential(jobs)):
        assert torch.equal(g, w)


def test_plan_balances_cost_largest_first():
    big = (torch.zeros(4, 256, 128), 0.125, "eigh", None)
    small = (torch.zeros(64, 32), 0.125, "eigh", None)
    plan = plan_lanes([small, big, small, big, small], 2)
    assert plan[0][0] in (1, 3) and plan[1][0] in (1, 3)  # one big job heads each lane
    assert plan_lanes([small], 4) == [[0]]


def test_errors_and_grad_mode_reach_the_caller():
    jobs = _jobs()
    bad = jobs + [(torch.randn(8, 8), 0.125, "no_such_method", None)]
    with pytest.raises(ValueError, match="unknown spectral method 'no_such_method'"):
        run_lanes(bad, plan_lanes(bad, 3), lambda k: contextlib.nullcontext())
    with pytest.raises(ValueError, match="streams must be >= 1"):
        spectral_power_groups(jobs, streams=0)
    x = torch.randn(16, 8, requires_grad=True)
    with torch.no_grad():
        (out,) = run_lanes([(x, 0.125, "eigh", None)], [[0]], lambda k: contextlib.nullcontext())
    assert not out.requires_grad  # the worker thread ran under the caller's no_grad


@pytest.mark.parametrize("parts", [2, 3, 4])
def test_split_batches_spread_one_shape_and_merge_back(parts):
    """The CUDA path splits each batch over the streams; on the CPU: the same split, run on
    threads, merged back, equals the unsplit calls (every method works matrix by matrix)."""
    jobs = _jobs()
    sub, owners = split_batches(jobs, parts)
    assert [len(o) for o in owners] == [min(parts, 3), 1, min(parts, 2), 1, min(parts, 2)]
    assert sorted(i for o in owners for i in o) == list(range(len(sub)))
    assert all(s[0].data_ptr() >= j[0].data_ptr() for o, j in zip(owners, jobs) for s in (sub[i] for i in o))
    outs = run_lanes(sub, plan_lanes(sub, parts), lambda k: contextlib.nullcontext())
    for g, w in zip(merge_batches(outs, owners), _sequential(jobs)):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)
