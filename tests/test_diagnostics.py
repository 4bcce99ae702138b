"""htmuon_dist.diagnostics: the ESD power-law fit recovers known tails; the other statistics
match their definitions; degenerate inputs do not crash."""

from __future__ import annotations

import math

import pytest
import torch

from htmuon_dist.diagnostics import eigenvalues, esd_alpha, fit_power_law, spectral_stats


def _orthonormal(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def heavy_tailed(m: int, n: int, alpha: float, bulk: str, seed: int) -> torch.Tensor:
    """W = U diag(sqrt(λ)) Vᵀ with random orthonormal U, V. The top eigenvalues of WᵀW are
    i.i.d. Pareto draws with density ∝ λ^-alpha above 1; with ``bulk`` = "mp" 40% of them are
    instead a Marchenko–Pastur bulk (a Gaussian matrix's Gram eigenvalues) squeezed into
    [0.02, 0.8], below the tail, as in a trained layer."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    n_bulk = int(0.4 * k) if bulk == "mp" else 0
    u = torch.rand(k - n_bulk, generator=g, dtype=torch.float64)
    tail = u.pow(-1.0 / (alpha - 1.0))  # inverse CDF of the Pareto law, x_min = 1
    parts = [tail]
    if n_bulk:
        G = torch.randn(2 * n_bulk, n_bulk, generator=g, dtype=torch.float64)
        mp = torch.linalg.eigvalsh(G.T @ G)
        parts.append(0.02 + 0.78 * (mp - mp.min()) / (mp.max() - mp.min()))
    lam = torch.cat(parts)
    lam = lam[torch.randperm(k, generator=g)]
    U, V = _orthonormal(m, k, g), _orthonormal(n, k, g)
    return ((U * lam.sqrt()) @ V.T).float()


@pytest.mark.parametrize("shape", [(1024, 512), (512, 1024), (1280, 640)])
@pytest.mark.parametrize("alpha", [2.0, 3.0, 4.0])
@pytest.mark.parametrize("bulk", ["none", "mp"])
def test_recovers_known_alpha(shape, alpha, bulk):
    for seed in range(3):
        W = heavy_tailed(*shape, alpha, bulk, seed)
        st = spectral_stats(W)
        assert abs(st.alpha - alpha) <= 0.35, (shape, alpha, bulk, seed, st)
        if bulk == "mp":
            # The KS choice of x_min must land at the tail, not inside the bulk (<= 0.8).
            assert st.xmin >= 0.8, (seed, st)
            assert st.num_tail <= min(shape) - int(0.4 * min(shape))


def test_4d_weight_is_viewed_as_matrix():
    W = heavy_tailed(512, 512, 3.0, "none", 0).reshape(512, 128, 2, 2)
    assert abs(esd_alpha(W) - 3.0) <= 0.35


@pytest.mark.parametrize("alpha", [1.5, 2.5, 6.0])
def test_exact_quantiles_small_n(alpha):
    """Pareto quantiles (no sampling noise): the fit is close even with 64 values."""
    n = 64
    q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    x = 3.0 * q.pow(-1.0 / (alpha - 1.0))
    a, xmin, D, ntail = fit_power_law(x)
    assert abs(a - alpha) < 0.1 * alpha
    assert D < 0.1 and ntail >= 10


def test_mle_formula_and_ks_against_a_direct_loop():
    """With the tail forced to all points, alpha is the closed-form MLE; D is the KS distance
    computed point by point."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(50, generator=g, dtype=torch.float64).pow(-0.5) * 2.0
    a, xmin, D, ntail = fit_power_law(x, min_tail=50)
    xs = sorted(x.tolist())
    assert ntail == 50 and xmin == xs[0]
    expect = 1 + 50 / sum(math.log(v / xs[0]) for v in xs)
    assert a == pytest.approx(expect, rel=1e-12)
    cdf = [1 - (v / xs[0]) ** (1 - expect) for v in xs]
    direct = max(max(abs((j + 1) / 50 - c), abs(j / 50 - c)) for j, c in enumerate(cdf))
    assert D == pytest.approx(direct, rel=1e-9)


def test_other_statistics_match_definitions():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(96, 40, generator=g)
    st = spectral_stats(W)
    s = torch.linalg.svdvals(W.double())
    assert st.spectral_norm == pytest.approx(float(s[0]), rel=1e-9)
    assert st.lambda_max == pytest.approx(float(s[0]) ** 2, rel=1e-9)
    assert st.stable_rank == pytest.approx(float((s ** 2).sum() / s[0] ** 2), rel=1e-9)
    assert st.alpha_weighted == pytest.approx(st.alpha * math.log10(st.lambda_max), rel=1e-12)
    assert st.num_evals == 40 and 10 <= st.num_tail <= 40
    assert st.ks_distance < 0.5
    assert torch.allclose(eigenvalues(W), (s.flip(0) ** 2), rtol=1e-9, atol=1e-9)
    assert spectral_stats(W.T).alpha == pytest.approx(st.alpha, rel=1e-9)
    # alpha is scale-free; the bf16 input is cast to float64 before anything is computed
    assert spectral_stats(7.0 * W).alpha == pytest.approx(st.alpha, rel=1e-6)
    assert math.isfinite(spectral_stats(W.bfloat16()).alpha)


def test_degenerate_inputs():
    zero = spectral_stats(torch.zeros(8, 5))
    assert math.isnan(zero.alpha) and zero.num_evals == 0 and zero.stable_rank == 0.0
    g = torch.Generator().manual_seed(2)
    low_rank = torch.randn(60, 3, generator=g) @ torch.randn(3, 40, generator=g)
    st = spectral_stats(low_rank)
    assert st.num_evals == 3  # the 37 rounding-noise eigenvalues are not part of any tail
    assert spectral_stats(torch.zeros(0, 4)).num_evals == 0
    nonfinite = torch.ones(6, 4)
    nonfinite[2, 1] = float("nan")
    assert math.isnan(spectral_stats(nonfinite).alpha) and spectral_stats(nonfinite).num_evals == 0
    with pytest.raises(ValueError, match="W: expected a matrix"):
        spectral_stats(torch.ones(5))
