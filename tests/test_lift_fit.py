"""benchmarks/lift_fit.py parts 5 and 6: the free read-out (a linear combination of the lift's
iterates) and the read-out's map (log_ns's quartic against exp and the direct fit), the numbers
docs/spectral.md quotes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import lift_fit  # noqa: E402
from htmuon_dist.spectral.newton_schulz import NS5_COEFFS  # noqa: E402


@pytest.fixture(params=["scipy", "lawson"])
def solver(request, monkeypatch):
    """Both paths of iterate_fit: scipy's LP (where scipy is installed; else Lawson again) and
    Lawson's fallback."""
    if request.param == "lawson" or importlib.util.find_spec("scipy") is None:
        monkeypatch.setitem(sys.modules, "scipy.optimize", None)  # the import raises ImportError
    return request.param


def test_a_power_in_the_span_fits_exactly(solver):
    # p = 1 is s_0 = σ itself; p = 0.5 is not in the span of odd iterates
    assert lift_fit.iterate_fit((NS5_COEFFS,) * 3, 1.0, 3e-4) < 1e-9
    assert lift_fit.iterate_fit((NS5_COEFFS,) * 3, 0.5, 3e-4) > 0.1


def test_jordan_steps_miss_the_bar_at_21_products(solver):
    # the number docs/spectral.md quotes (0.097) against a quarter of the Gaussian's gap at p = 1/8 (0.027)
    err = lift_fit.iterate_fit((NS5_COEFFS,) * 7, 1 / 8, 3e-4)
    assert 0.09 < err < 0.105
    assert lift_fit.iterate_fit((NS5_COEFFS,) * 8, 1 / 8, 3e-4) < err  # more iterates, a richer basis


def test_bad_optimise_steps_names_the_range():
    with pytest.raises(SystemExit, match="--optimise-steps must be a step count in 1..12"):
        lift_fit.main(["--optimise-steps", "13", "--skip-soft-cut"])


def test_the_quartic_map_fits_as_well_as_exp_and_the_direct_fit_does_not():
    errors = lift_fit.readout_map_errors(3e-4, 8)
    exp, quartic = errors["E = exp(L/2) (log_ns before)"], errors["E = Taylor 4 (log_ns)"]
    assert max(exp) < 0.035 and max(quartic) < 0.035  # log_ns's bound on the fit (FIT_TARGET)
    assert all(q < 1.1 * e for q, e in zip(quartic, exp))  # log_ns's 2-product map loses nothing
    assert min(errors["E = 1 + L/2"]) > 0.1  # the map matters: a linear E is ~10x off
    assert min(errors["W = L (direct)"]) > 0.3  # the same basis on sigma^p / s_3 itself


def test_the_square_search_finds_log_ns_own_plan_and_prints_counts(monkeypatch):
    # one cell of part 7's grid: log_ns's square schedule (3 X steps, final degree 6, lift 2.58)
    # reaches its bound at 28 products (1.87x NS5) at 2048^2's floor, and no fewer
    monkeypatch.setattr(lift_fit, "SEARCH_DEGREES", (6,))
    monkeypatch.setattr(lift_fit, "SEARCH_X_STEPS", (3,))
    monkeypatch.setattr(lift_fit, "SEARCH_GRAM_LIFTS", (2.58,))
    lines = lift_fit.square_search(4.25e-4, 1 / 8)
    within = [line for line in lines if line.endswith("within the bound")]
    assert within and within[0].lstrip().startswith("28 products (1.87x NS5)")
    assert "3 X, 9 Gram steps of 2.58" in within[0]
    assert not any(line.endswith("within the bound") for line in lines[1:lines.index(within[0])])
