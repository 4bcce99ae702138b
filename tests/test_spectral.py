"""The exact spectral methods against a float64 SVD, REFERENCE.md's "what correct means"."""

from __future__ import annotations

import pytest
import torch

from htmuon_dist import default_rtol, newton_schulz5, spectral_power
from spectra import SCALES, SPECTRA, make_matrix, noise_rtol, random_orthonormal, reference_power, rel_err

EXACT = ("svd", "eigh")
SHAPES = ((48, 32), (32, 48), (40, 40), (1, 17), (17, 1), (3, 64))
POWERS = (0.0, 0.125, 0.5, 1.0)


@pytest.mark.parametrize("method", EXACT)
@pytest.mark.parametrize("kind", SPECTRA)
def test_exact_methods_match_float64_svd(method, kind):
    worst = 0.0
    for m, n in SHAPES:
        base = make_matrix(kind, m, n, seed=m * 100 + n)
        for scale in SCALES:
            x = (scale * base).float()
            for p in POWERS:
                y = spectral_power(x, p, method=method)
                assert y.dtype == torch.float32 and y.shape == x.shape
                assert torch.isfinite(y).all()
                worst = max(worst, rel_err(y, reference_power(x, p, noise_rtol(m, n))))
    assert worst <= 1e-4, f"{method} on {kind}: worst relative error {worst:.2e}"


@pytest.mark.parametrize("method", EXACT)
def test_equivariances(method):
    p = 0.125
    x = make_matrix("gaussian", 30, 20, seed=1).float()
    y = spectral_power(x, p, method=method)
    for c in (1e-4, 3.0, 1e3):
        assert rel_err(spectral_power(c * x, p, method=method), c**p * y) < 1e-5
    assert rel_err(spectral_power(x.T.contiguous(), p, method=method), y.T) < 1e-5
    g = torch.Generator().manual_seed(7)
    q1, q2 = random_orthonormal(30, 30, g), random_orthonormal(20, 20, g)
    rotated = (q1 @ x.double() @ q2.T).float()
    expected = q1 @ y.double() @ q2.T
    assert rel_err(spectral_power(rotated, p, method=method), expected) < 1e-5


@pytest.mark.parametrize("method", EXACT)
def test_limits(method):
    x = make_matrix("inverse", 24, 16, seed=2).float()
    # p = 1 gives M back
    assert rel_err(spectral_power(x, 1.0, method=method), x) < 1e-5
    # p = 0 gives the polar factor: orthonormal columns, and polar(M)^T M symmetric PSD
    q = spectral_power(x, 0.0, method=method).double()
    assert torch.allclose(q.T @ q, torch.eye(16, dtype=torch.float64), atol=1e-5)
    h = q.T @ x.double()
    assert torch.allclose(h, h.T, atol=1e-5) and torch.linalg.eigvalsh(h).min() > 0
    # zero matrix -> zeros, no NaN; empty matrix -> empty
    for shape in ((5, 3), (2, 5, 3)):
        z = spectral_power(torch.zeros(shape), 0.125, method=method)
        assert torch.equal(z, torch.zeros(shape))
    assert spectral_power(torch.zeros(0, 4), 0.5, method=method).shape == (0, 4)


@pytest.mark.parametrize("method", EXACT)
def test_batch_equals_per_matrix_and_keeps_dtype(method):
    xs = torch.stack([make_matrix(k, 20, 12, seed=i).float() for i, k in enumerate(SPECTRA)])
    batched = spectral_power(xs, 0.125, method=method)
    for x, y in zip(xs, batched):
        assert rel_err(y, spectral_power(x, 0.125, method=method)) < 1e-6
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        assert spectral_power(xs[0].to(dtype), 0.125, method=method).dtype == dtype


@pytest.mark.parametrize("method", EXACT)
def test_cutoff_drops_rounding_noise_of_rank_deficient_products(method):
    """A rank-8 product stored in fp32 has ~1e-8-relative noise directions; with p > 0 they
    would get weight (1e-8)^p ~ 0.1 each. The default cutoff removes them."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(64, 8, dtype=torch.float64, generator=g)
    b = torch.randn(8, 48, dtype=torch.float64, generator=g)
    exact = a @ b
    x = exact.float()
    truth = reference_power(exact, 0.125, 1e-12)  # the rank-8 answer in real arithmetic
    assert rel_err(spectral_power(x, 0.125, method=method), truth) < 1e-5
    noisy = spectral_power(x, 0.125, method=method, rtol=0.0)
    assert rel_err(noisy, truth) > 0.1  # without the cutoff the noise weighs ~20%


@pytest.mark.parametrize("method", EXACT)
def test_cutoff_on_layernorm_style_gradient(method):
    """Gradients behind a mean-removing layer have the all-ones input direction in their null
    space; the update must not push weights along it."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(256, 32, generator=g)
    x = x - x.mean(dim=1, keepdim=True)  # LayerNorm-style: rows orthogonal to ones
    delta = torch.randn(256, 40, generator=g)
    grad = delta.T @ x  # (40, 32), grad @ ones = 0 up to rounding
    ones = torch.ones(32, 1) / 32**0.5
    y = spectral_power(grad, 0.125, method=method)
    leak = float(torch.linalg.norm(y @ ones) / torch.linalg.norm(y))
    assert leak < 1e-5
    leak_without = spectral_power(grad, 0.125, method=method, rtol=0.0) @ ones
    assert float(torch.linalg.norm(leak_without) / torch.linalg.norm(y)) > 1e-2


def test_default_rtol_follows_dtype_and_shape():
    """Updated with the noise-following rule (issue #13; the old test pinned a fixed 4 eps):
    the Frobenius-relative part is eps (sqrt(m) + sqrt(n)) / sqrt(mn), the floor 8 sqrt(eps_64)."""
    cut = default_rtol(torch.bfloat16, (1024, 1024))
    assert cut.fro == pytest.approx(0.0078125 * 2 / 32)
    assert float(cut) == pytest.approx(8 * 2.220446049250313e-16**0.5)
    assert default_rtol(torch.float32, (172, 64)).fro == pytest.approx(1.1920929e-07 * (172**0.5 + 8) / (172 * 64) ** 0.5)
    # the eps of the data, not of the compute dtype (an fp32 copy of bf16 momentum)
    assert default_rtol(torch.float32, (64, 64), eps=2.0**-7).fro == default_rtol(torch.bfloat16, (64, 64)).fro
    assert default_rtol(torch.float64, (64, 64)).fro < 1e-15


def test_bad_input_is_refused_with_a_clear_message():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="power must be in"):
        spectral_power(x, 1.5)
    with pytest.raises(ValueError, match="power must be in"):
        spectral_power(x, float("nan"))
    with pytest.raises(ValueError, match="unknown spectral method 'qr'"):
        spectral_power(x, 0.1, method="qr")
    with pytest.raises(ValueError, match="only orthogonalises"):
        spectral_power(x, 0.125, method="ns5")
    with pytest.raises(ValueError, match=r"\(m, n\) or \(b, m, n\)"):
        spectral_power(torch.randn(5), 0.1)
    with pytest.raises(TypeError, match="floating-point"):
        spectral_power(torch.ones(3, 3, dtype=torch.int64), 0.1)
    with pytest.raises(ValueError, match="rtol"):
        spectral_power(x, 0.1, rtol=2.0)


def test_newton_schulz5_is_muon_not_the_exact_polar_factor():
    """The docstring's accuracy claim: 7-39% from U V^T on well-conditioned spectra."""
    for kind in ("gaussian", "inverse", "spike_bulk"):
        x = make_matrix(kind, 96, 64, seed=5).float()
        polar = reference_power(x, 0.0, noise_rtol(*x.shape))
        err = rel_err(newton_schulz5(x), polar)
        assert 0.02 < err < 0.40, (kind, err)
        assert rel_err(spectral_power(x, 0.0, method="ns5"), polar) == pytest.approx(err, rel=1e-5)
    assert torch.equal(newton_schulz5(torch.zeros(4, 6)), torch.zeros(4, 6))
    assert newton_schulz5(torch.randn(8, 4), dtype=torch.bfloat16).dtype == torch.bfloat16
