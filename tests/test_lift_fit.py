"""benchmarks/lift_fit.py parts 5 and 6: the free read-out (a linear combination of the lift's
iterates) and the log fit against the direct one, the numbers docs/spectral.md quotes."""

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


def test_the_log_fit_is_what_makes_exp_worth_its_products():
    errors = lift_fit.log_or_direct_errors(3e-4, 8)
    assert max(errors["log"]) < 0.035  # log_ns's bound on the fit (FIT_TARGET)
    assert min(errors["direct"]) > 0.3  # the same basis on sigma^p / s_3 itself
