"""The matmul-only ``tracked_ns`` method: its design, its proven bound, and the bar at n = 512.

The bound (tracked_ns.py): in exact arithmetic the method maps every normalised singular value
``s = sigma / c`` through a known scalar function ``F``; ``schedule(p, ell).bound`` is
``max |F(s)/s^p - 1|`` over ``[ell, 1]``. A matrix whose kept singular values lie in that range
therefore gets a relative Frobenius error <= bound, plus float32 rounding (measured <= 2e-5 here).
"""

from __future__ import annotations

import math

import pytest
import torch

from htmuon_dist.spectral import default_rtol, spectral_power
from htmuon_dist.spectral.tracked_ns import (
    BAND,
    MIN_ELL,
    STEP,
    TARGET,
    _evaluate,
    NOISE_CUT,
    noise_ell,
    schedule,
    tracked_ns_power,
)
from htmuon_dist.spectral.accuracy import SPECTRA, random_orthonormal, bar, make_matrix, reference, rel_err

ROUNDING = 2e-5  # float32 rounding allowance on top of the designed bound (n <= 256)


def test_step_polynomial_keeps_its_range_and_lifts() -> None:
    s = torch.linspace(0.0, BAND[1], 20001, dtype=torch.float64)
    a, b, c = STEP
    h = a + b * s * s + c * s**4
    assert float((s * h).max()) <= BAND[1]  # [0, 1.2] maps into itself
    assert float(h.min()) >= 0.5  # h^(-p) stays smooth: no factor near zero
    band = s[s >= BAND[0]]
    mapped = band * (a + b * band**2 + c * band**4)
    assert float(mapped.min()) >= BAND[0]  # the band is invariant
    assert a > 2.5  # lift per step


@pytest.mark.parametrize("power", [0.0, 0.125, 0.25, 0.5, 0.75, 0.9])
@pytest.mark.parametrize("ell", [MIN_ELL, 3.3e-4, 1.8e-2])
def test_schedule_bound_is_small_and_true(power: float, ell: float) -> None:
    sched = schedule(power, ell)
    assert sched.bound <= 6 * TARGET, sched
    assert sched.tail <= 1e-3, sched  # directions below ell / cut_factor are cut
    # the bound is the max over a 4000-point grid; a 10x denser grid must not find more than
    # a hair above it (F is smooth)
    dense = torch.logspace(math.log10(ell), 0.0, 40000, dtype=torch.float64)
    values = _evaluate((sched.g_first, sched.g_rest, sched.f), power, sched.steps, dense)
    assert float((values / dense**power - 1).abs().max()) <= sched.bound * 1.01 + 1e-9


def test_more_lift_needs_more_steps() -> None:
    assert schedule(0.125, MIN_ELL).steps == 12
    assert schedule(0.125, 1.8e-2).steps < schedule(0.125, 3.3e-4).steps < 12


@pytest.mark.parametrize("power", [0.125, 0.5])
@pytest.mark.parametrize("spread", ["uniform", "log", "clustered"])
@pytest.mark.parametrize("shape", [(200, 120), (120, 120)])
def test_matrix_error_within_proven_bound(power: float, spread: str, shape: tuple[int, int]) -> None:
    """Random singular vectors, singular values anywhere in [2 ell c, c]: error <= bound + rounding."""
    m, n = shape
    gen = torch.Generator().manual_seed(int(1000 * power) + 10 * len(spread) + m)
    # fp32's noise cutoff lies far below MIN_ELL, so the normaliser is c (see NOISE_LIFT)
    ell = noise_ell(default_rtol(torch.float32, shape).fro)
    lo = 2 * ell * n**0.125  # c <= n^(1/8) sigma_max, so s = sigma / c >= ell
    if spread == "uniform":
        s = lo + (1 - lo) * torch.rand(n, generator=gen, dtype=torch.float64)
    elif spread == "log":
        s = torch.logspace(0, math.log10(lo), n, dtype=torch.float64)
    else:
        s = torch.where(torch.rand(n, generator=gen, dtype=torch.float64) < 0.5, lo, 1.0)
        s = s * (1 + 0.01 * torch.rand(n, generator=gen, dtype=torch.float64))
    mat = ((random_orthonormal(m, n, gen) * s) @ random_orthonormal(n, n, gen).T).float()
    r, _ = reference(mat, power)
    y = spectral_power(mat, power, method="tracked_ns")
    assert rel_err(y, r) <= schedule(power, ell, NOISE_CUT).bound + ROUNDING


@pytest.mark.parametrize("kind", SPECTRA)
def test_bar_at_n512(kind: str) -> None:
    """The bar on a larger rectangular matrix (the small-shape sweep is in test_spectral_fast)."""
    mat = make_matrix(kind, 1024, 512, 1.0, seed=21)
    r, p = reference(mat, 0.125)
    y = spectral_power(mat, 0.125, method="tracked_ns")
    assert rel_err(y, r) <= 0.5 * bar(r, p), (kind, rel_err(y, r), bar(r, p))


def test_bf16_input_is_computed_in_float32_with_bf16_cutoff() -> None:
    mat = make_matrix("rank_bf16", 128, 96, 1.0, seed=2)
    out = tracked_ns_power(mat.unsqueeze(0), 0.125, default_rtol(torch.bfloat16, mat.shape))
    assert out.dtype == torch.float32
    r, p = reference(mat, 0.125)
    assert rel_err(out[0], r) <= 0.5 * bar(r, p)


def test_power_one_returns_input() -> None:
    x = torch.randn(2, 30, 20)
    assert torch.equal(tracked_ns_power(x, 1.0, 1e-6), x)


def test_lawson_fit_is_bitwise_reproducible():
    """Plans are built by Lawson fits on the host; the same problem must give the same bits on
    every call (and so in every process). The CPU's default lstsq driver (gelsy) did not."""
    import hashlib

    from htmuon_dist.spectral.tracked_ns import lawson_fit, poly_basis

    y = torch.logspace(-4, 0, 1500, dtype=torch.float64)
    basis = poly_basis(y, 12, 1.0)
    target = y.pow(-0.4375)
    digests = {hashlib.sha256(lawson_fit(basis, target, 40)[0].numpy().tobytes()).hexdigest() for _ in range(4)}
    assert len(digests) == 1
