"""The scale-ready step: bounded memory, a wire dtype that every rank applies the same way, and
the pure update functions (host synchronisations: tests/test_host_sync.py).

Memory is measured from the CPU allocator's own records (torch.profiler with
``profile_memory=True``: every allocation and free, kernels' workspaces included), so the
numbers are the step's real live bytes, not an estimate.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from dist_models import build, full_state, loss_fn, make_batches, wrap
from htmuon_dist import HTMuon, functional as F, param_groups, spectral_power
from memtrack import allocator_peak
from multirank import run_ranks
from test_distributed import OPT, PER_RANK_BATCH, assert_same_on_every_rank, assert_same_params, reference_run

MiB = 1 << 20
BF16_WIRE_TOL = 5e-3  # measured 9e-4 after 5 steps at W = 3 (DDP) against the one-process run
# A LLaMA-1B layer set scaled down 16x per side: 4 x 2048², 2 x 5461x2048, 2048x5461, 32000x2048.
SMALL_1B = [(128, 128)] * 4 + [(341, 128)] * 2 + [(128, 341), (2000, 128)]


def _matrices(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(*s, generator=g) * 0.02) for s in shapes]


def _set_grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


@pytest.mark.parametrize("method", ["eigh", "svd", "stream", "fast_ns"])
def test_one_process_step_stays_within_the_memory_contract(method):
    params = _matrices(SMALL_1B)
    opt = HTMuon([{"params": params, "htmuon": True}], lr=0.01, method=method)
    _set_grads(params, 1)
    opt.step()  # creates the momentum
    _set_grads(params, 2)
    peak = allocator_peak(opt.step)
    bound = opt.memory_bound()
    largest = max(m * n for m, n in SMALL_1B) * 4
    # the step does hold the largest matrix's transform input and result at once
    assert peak >= 2 * largest, peak
    assert peak <= bound, f"step peaked at {peak / MiB:.2f} MiB above state, contract {bound / MiB:.2f} MiB"
    if method == "eigh":  # the default: the bar at this scale
        assert bound <= 4 * largest + 256 * MiB


def test_bucket_cap_bounds_the_peak_and_a_single_bucket_does_not():
    """The same step with everything in one bucket holds every matrix's input and result at
    once: the streaming default must measure well below that."""
    shapes = [(256, 256)] * 8
    peaks = {}
    for name, cap in (("streamed", 2 * 256 * 256), ("one bucket", 10**9)):
        params = _matrices(shapes)
        opt = HTMuon([{"params": params, "htmuon": True}], lr=0.01, bucket_numel=cap)
        _set_grads(params, 1)
        opt.step()
        _set_grads(params, 2)
        peaks[name] = allocator_peak(opt.step)
        assert peaks[name] <= opt.memory_bound()
    total = sum(m * n for m, n in shapes) * 4
    assert peaks["one bucket"] >= 2 * total
    assert peaks["streamed"] <= peaks["one bucket"] / 3


def memory_worker(rank, world, backend, method="eigh"):
    model = build("llama")
    groups = param_groups(model, "reference")
    wrapped = wrap(model, "llama", backend)
    if backend == "fsdp2":
        groups = param_groups(model, "reference")
    opt = HTMuon(groups, **dict(OPT, method=method))
    lo, hi = rank * PER_RANK_BATCH, (rank + 1) * PER_RANK_BATCH
    batches = make_batches("llama", 2, 1, PER_RANK_BATCH * world)
    loss_fn("llama", wrapped, batches[0][0][lo:hi]).backward()
    opt.step()
    opt.zero_grad()
    loss_fn("llama", wrapped, batches[1][0][lo:hi]).backward()
    peak = allocator_peak(opt.step)
    return peak, opt.memory_bound()


@pytest.mark.multirank
@pytest.mark.parametrize("backend,world,method", [
    ("fsdp2", 2, "eigh"), ("fsdp2", 3, "eigh"), ("ddp", 2, "eigh"), ("fsdp2", 3, "stream"),
    ("fsdp2", 2, "fast_ns"),
])
def test_sharded_step_stays_within_the_memory_contract(backend, world, method):
    for rank, (peak, bound) in enumerate(run_ranks(memory_worker, world, backend, method)):
        assert 0 < peak <= bound, f"rank {rank}: peak {peak} > contract {bound}"


# -- the wire dtype, applied evenly -----------------------------------------------------------


def test_bf16_wire_rounds_the_owners_own_input_and_result_too():
    """One process: the update is exactly spectral_power of the bf16-rounded Nesterov matrix,
    rounded to bf16, with the cutoff of bf16 data."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(24, 10))
    w0 = w.detach().clone()
    grad = torch.randn(24, 10)
    w.grad = grad.clone()
    lr, beta = 0.05, 0.95
    opt = HTMuon([{"params": [w], "htmuon": True}], lr=lr, momentum=beta, comm_dtype=torch.bfloat16)
    opt.step()
    buf = torch.zeros_like(grad).lerp_(grad, 1 - beta)
    m_wire = torch.lerp(grad, buf, beta).bfloat16()
    upd = spectral_power(m_wire, 0.125, "eigh")  # bf16 in, bf16 out, bf16's cutoff
    assert upd.dtype == torch.bfloat16
    want = w0.clone().add_(upd, alpha=-lr * max(1.0, 24 / 10) ** 0.5)
    assert torch.equal(w.detach(), want)
    # and it is not what the fp32 wire gives: the rounding really happened
    upd32 = spectral_power(torch.lerp(grad, buf, beta), 0.125, "eigh")
    assert not torch.equal(want, w0.clone().add_(upd32, alpha=-lr * max(1.0, 24 / 10) ** 0.5))


def ddp_wire_worker(rank, world, steps):
    model = build("llama")
    groups = param_groups(model, "reference")
    wrapped = wrap(model, "llama", "ddp")
    opt = HTMuon(groups, **OPT, comm_dtype=torch.bfloat16)
    lo, hi = rank * PER_RANK_BATCH, (rank + 1) * PER_RANK_BATCH
    for micro in make_batches("llama", steps, 1, PER_RANK_BATCH * world):
        loss_fn("llama", wrapped, micro[0][lo:hi]).backward()
        opt.step()
        opt.zero_grad()
    owners = sorted(set(opt.engine.plan.owners))
    return full_state(wrapped, "ddp"), owners


@pytest.mark.multirank
def test_bf16_wire_keeps_ddp_replicas_bit_identical_at_w3():
    results = run_ranks(ddp_wire_worker, 3, 5)
    first, owners = results[0]
    assert owners == [0, 1, 2]  # every rank owned some matrices, so every rank sent results
    assert_same_on_every_rank([params for params, _ in results])
    # the one-process run with the same wire: equal up to the gradient reduction order, which
    # can flip a bf16 rounding here and there
    want = reference_run("llama", 3, 5, 1, dict(OPT, comm_dtype=torch.bfloat16))
    assert_same_params(first, want, tol=BF16_WIRE_TOL)


# -- the pure update functions ----------------------------------------------------------------


@pytest.mark.parametrize("fused", [True, False])  # torch's fused kernel, the _foreach fallback
def test_adamw_matches_torch_adamw(fused):
    torch.manual_seed(0)
    shapes = [(5, 3), (7,), (2, 2, 2)]
    ours = [torch.randn(*s) for s in shapes]
    theirs = [nn.Parameter(t.clone()) for t in ours]
    ref = torch.optim.AdamW(theirs, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                            foreach=False)
    m = [torch.zeros_like(t) for t in ours]
    v = [torch.zeros_like(t) for t in ours]
    for step in range(1, 6):
        grads = [torch.randn(*s) for s in shapes]
        for p, g in zip(theirs, grads):
            p.grad = g.clone()
        ref.step()
        F.adamw_(ours, grads, m, v, [torch.tensor(float(step))] * 3, lr=1e-2, betas=(0.9, 0.95),
                 eps=1e-8, weight_decay=0.1, keep=torch.tensor(1.0), fused=fused)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=1e-7)
    # keep = 0 (a skipped step, decided on the device): every tensor stays bit for bit
    before = [t.clone() for t in ours + m + v]
    bad = [torch.randn(*s) for s in shapes]
    bad[1][0] = float("nan")  # a skipped step's gradient may hold NaN/Inf: still nothing moves
    F.adamw_(ours, bad, m, v, [torch.tensor(6.0)] * 3, lr=1e-2,
             betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, keep=torch.tensor(0.0), fused=fused)
    assert all(torch.equal(a, b) for a, b in zip(ours + m + v, before))


def test_momentum_nesterov_and_update_follow_the_formulas():
    torch.manual_seed(0)
    g, b, w = torch.randn(6, 4), torch.randn(6, 4), torch.randn(6, 4)
    b2, w2 = b.clone(), w.clone()
    F.momentum_([b2], [g], 0.9)
    torch.testing.assert_close(b2, 0.9 * b + 0.1 * g)
    out = torch.empty(6, 4)
    torch.testing.assert_close(F.nesterov_into(out, g, b2, 0.9, True), 0.1 * g + 0.9 * b2)
    torch.testing.assert_close(F.nesterov_into(out, g, b2, 0.9, False), b2)
    u = torch.randn(6, 4)
    F.decay_and_update_([w2], [u], [0.1], [0.5], [2.0])
    torch.testing.assert_close(w2, w * (1 - 0.05) - 0.2 * u)
    assert F.muon_scale(6, 4) == pytest.approx(math.sqrt(1.5))
    assert F.muon_scale(4, 6) == 1.0 and F.muon_scale(4, 6, "original") == 1.0
    assert F.muon_scale(4, 6, "match_rms_adamw") == pytest.approx(0.2 * math.sqrt(6))
    with pytest.raises(ValueError, match="adjust_lr_fn"):
        F.muon_scale(4, 6, "rms")


def test_adjust_lr_fn_match_rms_adamw_scales_the_update():
    torch.manual_seed(0)
    runs = {}
    for fn in ("original", "match_rms_adamw"):
        w = nn.Parameter(torch.zeros(30, 12))
        w.grad = torch.randn(30, 12, generator=torch.Generator().manual_seed(3))
        HTMuon([{"params": [w], "htmuon": True}], lr=0.1, adjust_lr_fn=fn).step()
        runs[fn] = w.detach().clone()
    ratio = (runs["match_rms_adamw"].norm() / runs["original"].norm()).item()
    assert ratio == pytest.approx(0.2 * math.sqrt(30) / math.sqrt(30 / 12), rel=1e-6)
    with pytest.raises(ValueError, match="adjust_lr_fn"):
        HTMuon([nn.Parameter(torch.zeros(3, 3))], adjust_lr_fn="adamw")


def test_nonfinite_patience_stops_a_diverging_run():
    w = nn.Parameter(torch.randn(5, 4))
    opt = HTMuon([{"params": [w], "htmuon": True}], nonfinite="skip", nonfinite_patience=3,
                 check_every=1)  # the patience is checked at every step's check
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k in range(2):
            w.grad = torch.full((5, 4), float("nan"))
            opt.step()
        w.grad = torch.randn(5, 4)  # a good step resets the count
        opt.step()
        for k in range(2):
            w.grad = torch.full((5, 4), float("inf"))
            opt.step()
        w.grad = torch.full((5, 4), float("nan"))
        with pytest.raises(FloatingPointError, match="3 steps in a row"):
            opt.step()
    assert opt.skipped_steps == 5
    # checked every 4 steps instead: the storm is still caught, at the next check
    opt = HTMuon([{"params": [w], "htmuon": True}], nonfinite="skip", nonfinite_patience=3,
                 check_every=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w.grad = torch.randn(5, 4)
        opt.step()  # step 1: the build check
        for k in range(2, 4):  # steps 2, 3: no check yet
            w.grad = torch.full((5, 4), float("nan"))
            opt.step()
        w.grad = torch.full((5, 4), float("nan"))
        with pytest.raises(FloatingPointError, match="3 steps in a row"):
            opt.step()  # step 4: the check sees 3 skipped in a row
    assert opt.skipped_steps == 3
    with pytest.raises(ValueError, match="nonfinite_patience"):
        HTMuon([w], nonfinite_patience=0)
