"""gram32: float32 Gram eigh, float64 only for the matrices whose conditioning needs it.

The accuracy bar on every test spectrum is enforced by tests/test_spectral_fast.py (gram32 is a
registered approximate method); here: the fallback decision, its error bound on the spectra of
tests/spectra.py against the float64 SVD, the single host sync, and the TF32 guard.
"""

from __future__ import annotations

import pytest
import torch

from htmuon_dist.spectral import gram32, spectral_power
from htmuon_dist.spectral.accuracy import bar, random_orthonormal, reference, rel_err
from spectra import SCALES, SPECTRA, make_matrix


def _logspaced(m: int, n: int, depth: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    s = torch.logspace(0, float(torch.log10(torch.tensor(depth))), n, dtype=torch.float64)
    return ((random_orthonormal(m, n, gen) * s) @ random_orthonormal(n, n, gen).T).float()


def _fallbacks(x: torch.Tensor, monkeypatch) -> list[int]:
    seen: list[int] = []
    real = gram32.eigh_power

    def spy(xs, power, rtol):
        seen.append(xs.shape[0])
        return real(xs, power, rtol)

    monkeypatch.setattr(gram32, "eigh_power", spy)
    spectral_power(x, 0.125, method="gram32")
    return seen


def test_only_ill_conditioned_matrices_fall_back(monkeypatch):
    good = _logspaced(96, 64, 0.1, 1)      # lambda_min / lambda_max = 1e-2: float32 suffices
    bad = _logspaced(96, 64, 1e-3, 2)      # 1e-6: float64
    assert _fallbacks(torch.stack([good, good]), monkeypatch) == []
    monkeypatch.undo()
    assert _fallbacks(torch.stack([good, bad, good, bad]), monkeypatch) == [2]


@pytest.mark.parametrize("kind", SPECTRA)
@pytest.mark.parametrize("scale", SCALES)
def test_error_against_the_float64_svd(kind, scale):
    """Every spectrum of tests/spectra.py: within 2e-4 of the float64 definition and under the
    bar; float32-kept matrices contribute <= 1.5 eps32 / kappa, fallbacks are exact."""
    x = (make_matrix(kind, 160, 96, seed=3) * scale).float()
    r, p = reference(x.double(), 0.125, 4 * torch.finfo(torch.float32).eps)
    y = spectral_power(x, 0.125, method="gram32")
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    err = rel_err(y, r)
    assert err <= 2e-4, (kind, scale, err)
    assert err <= bar(r, p)


@pytest.mark.parametrize("depth", [0.3, 0.1, 0.05, 0.0317])
def test_kept_float32_error_bound(depth):
    """Matrices that stay in float32 (lambda_min >= 1e-3 lambda_max) meet the documented bound."""
    x = _logspaced(300, 200, depth, 4)
    r, _ = reference(x, 0.125)
    y = spectral_power(x, 0.125, method="gram32")
    kappa = depth**2
    assert rel_err(y, r) <= 1.5 * torch.finfo(torch.float32).eps / kappa + 1e-6


def test_one_host_sync_per_call(monkeypatch):
    x = torch.stack([_logspaced(48, 32, 0.1, 5), _logspaced(48, 32, 1e-3, 6)])
    spectral_power(x, 0.125, method="gram32")
    calls = []
    real = torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: calls.append(1) or real(t))
    for name in ("item", "tolist", "__float__", "__int__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, lambda *a, **k: (_ for _ in ()).throw(AssertionError(name)))
    spectral_power(x, 0.125, method="gram32")
    assert len(calls) == 1


def test_tf32_setting_is_restored():
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        with gram32.ieee_fp32_matmuls():
            assert torch.get_float32_matmul_precision() == "highest"
            with gram32.ieee_fp32_matmuls():
                pass
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)
