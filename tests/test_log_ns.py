"""What only ``log_ns`` has (htmuon_dist/spectral/log_ns.py): its lift from 1.25 tau and cut below
0.45 tau, its plan's bound and leak, its registry entry and ``auto``'s CUDA rule. The checks it
shares with fast_ns (err/gap on bf16 data, equivariances, zero, batches, meta, product counts)
are in test_fast_ns.py; the rank cutoff's keep/drop checks, for every method that cuts, in
test_cutoff.py."""

from __future__ import annotations

import math

import pytest
import torch

from htmuon_dist.spectral import get_method, method_cost, method_workspace, spectral_power
from htmuon_dist.spectral import log_ns
from htmuon_dist.spectral.log_ns import log_ns_power

from test_fast_ns import BF16_EPS, _err_over_gap, _matrix, _reference


def test_square_power_law_down_to_the_cut() -> None:
    # sigma_i = 1/i on a 512 x 512 matrix puts its smallest singular values at ~2 tau: log_ns's
    # floor sits at 1.25 tau and lifts them; fast_ns's (4 tau) attenuates them (measured 2.5 and 1.1
    # gaps), which shows the case can fail
    x = _matrix("power_law", 512, 512, seed=7)
    for power in (1 / 16, 1 / 8):
        r, p = _reference(x, power)
        ratio = _err_over_gap(spectral_power(x.float(), power, method="log_ns", eps=BF16_EPS), r, p)
        assert ratio <= 0.25, (power, ratio)
        other = _err_over_gap(spectral_power(x.float(), power, method="fast_ns", eps=BF16_EPS), r, p)
        assert other > 0.25, (power, other)


@pytest.mark.parametrize("power, readout, squarings", [(0.125, "quartic", 0), (0.125, "exp", 2), (0.9, "exp", 0)])
def test_plan_bound_and_leak_are_what_it_applies(power: float, readout: str, squarings: int) -> None:
    # plan.bound is max |ln(F(s)/s^p)| over [floor, 1], plan.leak max |F(s)| / floor^p over
    # [0, zero], both in exact arithmetic; the matrix side with float32 products must apply that
    # F to each singular value (a diagonal matrix: the singular vectors are the axes, so each
    # direction is read off directly; F need not be monotone). Every way of applying the weight
    # runs: the quartic's E (E C), exp's E (E C) after its squarings, and exp's two-term product
    # where a plan has no squaring
    n = 48
    plan = log_ns.make_plan(power, 1e-3, log_ns.x_steps_for(80, n), readout=readout)
    assert plan.readout == readout and plan.squarings == squarings
    assert len(plan.steps) == 1 and len(plan.gram) >= 1  # tall: one X step, then the Gram phase
    assert plan.bound <= log_ns.FIT_TARGET * power and plan.leak <= log_ns.MAX_LEAK
    assert plan.floor == pytest.approx(log_ns.NOISE_LIFT * 1e-3) and plan.zero == pytest.approx(log_ns.NOISE_ZERO * 1e-3)
    s = torch.logspace(-5, 0, n, dtype=torch.float64)
    x = torch.zeros(80, n, dtype=torch.float64)
    x[:n, :n] = torch.diag(s)
    fro = float(x.norm())
    y = log_ns.run_plan(x[None].float(), plan, torch.float32)[0].double()
    got = torch.diagonal(y[:n, :n]) / fro**power  # F(s / ||x||_F)
    sig = s / fro
    kept, cut = sig >= plan.floor, sig <= plan.zero
    assert int(kept.sum()) >= 20 and int(cut.sum()) >= 10
    err = (got[kept] / sig[kept].pow(power)).log().abs().max().item()
    assert err <= plan.bound + 1e-4, (err, plan.bound)
    assert got[cut].abs().max().item() <= plan.leak * plan.floor**power + 1e-5
    assert (y - torch.diag_embed(torch.diagonal(y[:n, :n])).new_zeros(80, n)).abs()[n:].max() < 1e-6


def test_power_zero_and_bad_cutoff_name_the_fix() -> None:
    # the shared checks (power 1, power > 1, dtype) are in test_fast_ns.py, for both methods
    x = torch.randn(1, 20, 10)
    with pytest.raises(ValueError, match="polar_express"):
        log_ns_power(x, 0.0, 1e-3)
    with pytest.raises(ValueError, match="tau"):
        log_ns.make_plan(0.125, 0.5, 1)
    with pytest.raises(ValueError, match="x_steps"):
        log_ns.make_plan(0.125, 1e-3, 0)
    with pytest.raises(ValueError, match="readout must be one of"):
        log_ns.make_plan(0.125, 1e-3, 1, readout="cubic")


def test_registry_says_it_cuts_and_auto_names_it_on_tall_cuda_matrices() -> None:
    from htmuon_dist.spectral import auto_choice, auto_table

    assert get_method("log_ns").cuts_noise is True
    assert "log_ns" in auto_table.CANDIDATES
    assert all(get_method(name).cuts_noise for name in auto_table.CANDIDATES)
    assert auto_table.rule_method("cuda") == "log_ns" and auto_table.rule_method("cpu") != "log_ns"
    # the shapes at the paper's p = 1/8: all log_ns; at p = 1/16 the square ones, where
    # log_ns missed on Marchenko-Pastur spectra, stay eigh (docs/spectral.md, "log_ns")
    for m, n in [(2048, 5461), (5461, 2048), (4096, 11008), (2048, 2048), (4096, 4096)]:
        assert auto_choice("cuda", m, n, power=0.125) == "log_ns"
    for m, n in [(2048, 2048), (4096, 4096)]:
        assert auto_choice("cuda", m, n, power=0.0625) == "eigh"


def test_registry_cost_and_workspace() -> None:
    spec = get_method("log_ns")
    assert spec.powers == "any" and not spec.exact and spec.workspace is not None
    ns5 = method_cost("ns5", 5461, 2048)
    # 16-bit FLOPs; below fast_ns's at the same shape (docs/spectral.md, "log_ns")
    assert 1.0 < method_cost("log_ns", 5461, 2048) / ns5 < method_cost("fast_ns", 5461, 2048) / ns5
    assert method_cost("log_ns", 2048, 5461) == method_cost("log_ns", 5461, 2048)
    assert method_workspace("log_ns", 5461, 2048) >= 16 * 5461 * 2048
    assert math.isfinite(log_ns.make_plan(0.125, 2.7e-4, 1).bound)


@pytest.mark.parametrize("shape", [(512, 256), (256, 256), (1000, 100), (768, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_measured_memory_within_the_registered_workspace(shape, dtype):
    # the CPU allocator's peak during the call, less the float32 output, against the workspace
    # the engine sizes its batches with (measured 0.54-0.73 of it on this project's CPU)
    from memtrack import allocator_peak

    m, n = shape
    x = torch.randn(1, m, n, generator=torch.Generator().manual_seed(0)).to(dtype)
    log_ns_power(x, 0.125, 1e-3)  # the plan: fitted once on the host (float64 grids), then cached
    peak = allocator_peak(lambda: log_ns_power(x, 0.125, 1e-3))
    assert 0 < peak - 4 * m * n <= method_workspace("log_ns", m, n)


def test_plan_fit_is_reproducible_and_small() -> None:
    # the fit's columns are near-collinear after a long Gram phase; with the ridge term two fits
    # agree (a plain lstsq varied between runs, with coefficients up to 1e3) and stay small
    steps, gram = (log_ns.X_STEP,), (log_ns.GRAM_STEP,) * 14
    a = log_ns._fit(0.0625, 5.4e-4, 1.35e-4, steps, gram)
    b = log_ns._fit(0.0625, 5.4e-4, 1.35e-4, steps, gram)
    assert max(abs(u - v) for u, v in zip(a.coef, b.coef)) < 1e-9
    assert max(abs(u - v) for u, v in zip(a.cut, b.cut)) < 1e-9
    assert log_ns._well_posed(a) and max(abs(c) for c in a.coef) <= log_ns.MAX_COEF
    assert a.bound <= log_ns.FIT_TARGET * 0.0625 and a.leak <= log_ns.MAX_LEAK and a.biggest <= log_ns.MAX_E


def test_tall_plans_run_one_x_step_square_ones_three() -> None:
    # the priced cost at the LLaMA shapes rests on this split (docs/spectral.md, "log_ns")
    assert log_ns.x_steps_for(5461, 2048) == 1 and log_ns.x_steps_for(2048, 2048) == 3
    ns5 = method_cost("ns5", 5461, 2048)
    assert method_cost("log_ns", 5461, 2048) / ns5 <= 1.5
    assert method_cost("log_ns", 11008, 4096) / method_cost("ns5", 11008, 4096) <= 1.5


def test_the_quartic_read_out_inverts_its_map_and_saves_products() -> None:
    # L is fitted to x with ln q(x)^2 = target, q the quartic (rising above ~-3.19, where q' = 0)
    target = torch.linspace(-2.0, 8.0, 101, dtype=torch.float64)
    x, slope = log_ns.through_map(target, log_ns.QUARTIC)
    assert torch.allclose(2.0 * log_ns.poly(log_ns.QUARTIC, x).log(), target, atol=1e-9)
    assert bool((slope > 0).all()) and float(x.min()) > log_ns.rising_from(log_ns.QUARTIC)
    assert log_ns.rising_from(log_ns.QUARTIC) == pytest.approx(-3.19214, abs=1e-4)
    x_exp, slope_exp = log_ns.through_map(target, None)
    assert torch.equal(x_exp, target) and bool((slope_exp == 1).all())
    # the same schedule and fit bound as exp's at the square shape, 2-3 products fewer
    from htmuon_dist.spectral.cutoff import noise_cutoff

    tau = log_ns.normalised_cutoff(noise_cutoff((2048, 2048), BF16_EPS), 2048)
    for power in (0.0625, 0.125):
        quartic = log_ns.make_plan(power, tau, 3)
        exp = log_ns.make_plan(power, tau, 3, readout="exp")
        assert (quartic.steps, quartic.gram) == (exp.steps, exp.gram)
        assert quartic.bound <= log_ns.FIT_TARGET * power and quartic.bound <= 1.1 * exp.bound
        count = lambda plan: sum(log_ns.plan_products(plan).values())  # noqa: E731
        assert 2 <= count(exp) - count(quartic) <= 3, (power, count(exp), count(quartic))
