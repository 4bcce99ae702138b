"""``log_ns``: HTMuon's U Σ^p V^T from fp16 products with a joint log-domain fit
(htmuon_dist/spectral/log_ns.py). Accuracy is checked against an independent float64 SVD of the
same bf16 values with the bf16 noise cutoff: ``err / gap <= 0.25`` (docs/spectral.md, "log_ns")."""

from __future__ import annotations

import math

import pytest
import torch

from htmuon_dist.spectral import default_rtol, get_method, method_cost, method_workspace, spectral_power
from htmuon_dist.spectral import log_ns
from htmuon_dist.spectral.log_ns import log_ns_power

from test_fast_ns import BF16_EPS, _Products, _err_over_gap, _matrix, _orthonormal, _reference


@pytest.mark.parametrize("kind", ["heavy_tailed", "two_bulk", "marchenko_pastur", "power_law"])
@pytest.mark.parametrize("shape", [(192, 96), (96, 160)])
def test_error_over_gap_on_bf16_data(kind: str, shape: tuple[int, int]) -> None:
    x = _matrix(kind, *shape, seed=7)
    for power in (1 / 16, 1 / 8, 1 / 4):
        r, p = _reference(x, power)
        y = spectral_power(x.float(), power, method="log_ns", eps=BF16_EPS)  # the engine's fp32 copy
        assert y.dtype == torch.float32 and torch.isfinite(y).all()
        ratio = _err_over_gap(y, r, p)
        assert ratio <= 0.25, (kind, shape, power, ratio)


def test_square_power_law_down_to_the_cut() -> None:
    # sigma_i = 1/i on a square matrix puts ~20 % of the directions within 2x of the noise cutoff:
    # the floor sits at exactly tau, so they are lifted (fast_ns's soft band misses them by 0.4-0.9 gaps)
    x = _matrix("power_law", 256, 256, seed=7)
    for power in (1 / 16, 1 / 8):
        r, p = _reference(x, power)
        ratio = _err_over_gap(spectral_power(x.float(), power, method="log_ns", eps=BF16_EPS), r, p)
        assert ratio <= 0.25, (power, ratio)


def test_plan_bound_is_what_it_applies() -> None:
    # plan.bound is max |ln(F(s)/s^p)| over [floor, 1] in exact arithmetic; the matrix side with
    # float32 products must apply that F to each singular value (a diagonal matrix: the singular
    # vectors are the axes, so each direction is read off directly; F need not be monotone)
    n, power = 48, 0.125
    plan = log_ns.make_plan(power, 1e-3)
    assert plan.bound <= log_ns.FIT_TARGET * power
    s = torch.logspace(-3, 0, n, dtype=torch.float64)
    x = torch.zeros(80, n, dtype=torch.float64)
    x[:n, :n] = torch.diag(s)
    fro = float(x.norm())
    y = log_ns.run_plan(x[None].float(), plan, torch.float32)[0].double()
    got = torch.diagonal(y[:n, :n]) / fro**power  # F(s / ||x||_F)
    sig = s / fro
    kept = sig >= plan.floor
    err = (got[kept] / sig[kept].pow(power)).log().abs().max().item()
    assert err <= plan.bound + 1e-4, (err, plan.bound)
    assert (y - torch.diag_embed(torch.diagonal(y[:n, :n])).new_zeros(80, n)).abs()[n:].max() < 1e-6


def test_fp16_products_are_better_than_bf16() -> None:
    x = _matrix("heavy_tailed", 192, 96, seed=3)
    r, p = _reference(x, 0.125)
    rtol = default_rtol(torch.bfloat16, x.shape)
    e16 = _err_over_gap(log_ns_power(x[None], 0.125, rtol, dtype=torch.float16)[0], r, p)
    e_bf = _err_over_gap(log_ns_power(x[None], 0.125, rtol, dtype=torch.bfloat16)[0], r, p)
    assert log_ns.DEFAULT_DTYPE == torch.float16
    assert e16 < 0.5 * e_bf, (e16, e_bf)


def test_equivariances() -> None:
    x = _matrix("power_law", 120, 72, seed=2).float()
    rtol = default_rtol(torch.bfloat16, x.shape)
    base = log_ns_power(x[None], 0.125, rtol)[0].double()
    for c in (2.0**-20, 2.0**9):  # a power-of-two scale reaches the same operands
        scaled = log_ns_power((x * c)[None], 0.125, rtol)[0].double()
        assert float((scaled - base * c**0.125).norm() / base.norm()) < 1e-5, c
    scaled = log_ns_power((x * 3.0)[None], 0.125, rtol)[0].double()
    assert float((scaled - base * 3.0**0.125).norm() / base.norm()) < 3e-3
    y = spectral_power(x, 0.125, method="log_ns", eps=BF16_EPS).double()
    yt = spectral_power(x.T.contiguous(), 0.125, method="log_ns", eps=BF16_EPS).double()
    assert torch.equal(yt, y.T)
    gen = torch.Generator().manual_seed(4)
    q1, q2 = _orthonormal(120, 120, gen), _orthonormal(72, 72, gen)
    rotated = log_ns_power((q1 @ x.double() @ q2.T).float()[None], 0.125, rtol)[0].double()
    assert float((rotated - q1 @ base @ q2.T).norm() / base.norm()) < 3e-3


@pytest.mark.parametrize("shape", [(32, 16), (16, 32), (3, 32, 16)])
def test_zero_matrix_gives_zero(shape: tuple[int, ...]) -> None:
    y = spectral_power(torch.zeros(shape), 0.125, method="log_ns")
    assert torch.equal(y, torch.zeros(shape))


def test_batch_equals_each_alone() -> None:
    mats = torch.stack([_matrix(k, 64, 40, seed=i).float() for i, k in enumerate(["heavy_tailed", "two_bulk"])])
    mats[1] *= 1e-4
    rtol = default_rtol(torch.bfloat16, mats.shape)
    together = log_ns_power(mats, 0.125, rtol)
    for i in range(2):
        alone = log_ns_power(mats[i : i + 1], 0.125, rtol)[0]
        assert float((together[i] - alone).norm() / alone.norm()) < 1e-6


def test_power_one_and_bad_input() -> None:
    x = torch.randn(1, 20, 10)
    assert torch.equal(log_ns_power(x, 1.0, 1e-3), x)
    with pytest.raises(ValueError, match="power"):
        log_ns_power(x, 1.5, 1e-3)
    with pytest.raises(ValueError, match="polar_express"):
        log_ns_power(x, 0.0, 1e-3)
    with pytest.raises(ValueError, match="dtype"):
        log_ns_power(x, 0.125, 1e-3, dtype=torch.float64)
    with pytest.raises(ValueError, match="floor"):
        log_ns.make_plan(0.125, 0.5)


@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
def test_runs_on_meta_with_16_bit_products_only(in_dtype: torch.dtype) -> None:
    """On meta nothing is computed: a host read or a data-dependent branch would raise."""
    x = torch.empty(2, 1365, 512, device="meta", dtype=in_dtype)
    with _Products() as seen:
        y = log_ns_power(x, 0.125, default_rtol(torch.bfloat16, x.shape))
    assert y.shape == x.shape and y.dtype == torch.float32 and y.device.type == "meta"
    assert seen.dtypes and set(seen.dtypes) <= {torch.float16, torch.bfloat16}, set(seen.dtypes)
    assert not seen.reads
    assert seen.dtypes[0] == (torch.bfloat16 if in_dtype == torch.bfloat16 else torch.float16)
    # the product count the registry's cost states is the one the run makes
    plan = log_ns.make_plan(0.125, log_ns.plan_floor(default_rtol(torch.bfloat16, x.shape), 512))
    counts = log_ns.plan_products(plan)
    assert len(seen.dtypes) == counts["mn2"] + counts["n3"], (len(seen.dtypes), counts)


def test_registry_says_it_has_no_rank_cutoff_and_auto_never_picks_it() -> None:
    from htmuon_dist.spectral import auto_table

    assert get_method("log_ns").cuts_noise is False
    assert "log_ns" not in auto_table.CANDIDATES
    assert all(get_method(name).cuts_noise for name in auto_table.CANDIDATES)
    for device in ("cuda", "cpu"):
        assert auto_table.rule_method(device) != "log_ns"


def test_registry_cost_and_workspace() -> None:
    spec = get_method("log_ns")
    assert spec.powers == "any" and not spec.exact and spec.workspace is not None
    ns5 = method_cost("ns5", 5461, 2048)
    # 16-bit FLOPs; below fast_ns's at the same shape (docs/spectral.md, "log_ns")
    assert 1.0 < method_cost("log_ns", 5461, 2048) / ns5 < method_cost("fast_ns", 5461, 2048) / ns5
    assert method_cost("log_ns", 2048, 5461) == method_cost("log_ns", 5461, 2048)
    assert method_workspace("log_ns", 5461, 2048) >= 16 * 5461 * 2048
    assert math.isfinite(log_ns.make_plan(0.125, 2.7e-4).bound)
