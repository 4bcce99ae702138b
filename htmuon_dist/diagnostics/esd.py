"""Heavy-tailed self-regularisation (HT-SR) metrics of one weight matrix.

Convention (WeightWatcher's): the empirical spectral density (ESD) is the distribution of the
eigenvalues ``λ_i`` of ``WᵀW`` (the squared singular values of W, unnormalised). Above a cutoff
``x_min`` it is fitted by a continuous power law, density ∝ λ^-α:

* for every candidate ``x_min`` (each distinct eigenvalue leaving at least ``min_tail`` above
  it) α is the maximum-likelihood estimate ``1 + n / Σ log(λ_i / x_min)`` over the ``n`` tail
  eigenvalues;
* ``x_min`` is the candidate whose fitted law is closest to the tail's empirical distribution
  in Kolmogorov–Smirnov distance (Clauset, Shalizi and Newman 2009).

Everything is computed in float64 on the matrix's device, then returned as Python floats.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch

# Eigenvalues below this fraction of λ_max are rounding noise of a rank-deficient W (float64
# Gram eigenvalues carry absolute errors of ~eps·λ_max), not part of any tail.
_ZERO_RTOL = 1e-10
# Candidates per chunk of the O(N²) KS scan: bounds memory at ~8·N·chunk bytes.
_CHUNK = 256


@dataclass(frozen=True)
class SpectralStats:
    """HT-SR statistics of one matrix (see the module docstring for the conventions).

    Attributes:
        alpha: power-law exponent of the ESD's tail (density ∝ λ^-alpha); NaN when fewer than
            ``min_tail`` nonzero eigenvalues exist.
        xmin: the fitted tail's lower cutoff (an eigenvalue of WᵀW).
        ks_distance: Kolmogorov–Smirnov distance between the tail and the fitted law.
        num_tail: eigenvalues >= xmin used in the fit.
        num_evals: nonzero eigenvalues (min(m, n) for a full-rank W).
        lambda_max: the largest eigenvalue of WᵀW (= spectral_norm²).
        spectral_norm: the largest singular value of W.
        stable_rank: ‖W‖_F² / ‖W‖_2² = Σλ / λ_max.
        alpha_weighted: alpha · log10(lambda_max) (WeightWatcher's "alpha_weighted").
    """

    alpha: float
    xmin: float
    ks_distance: float
    num_tail: int
    num_evals: int
    lambda_max: float
    spectral_norm: float
    stable_rank: float
    alpha_weighted: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def eigenvalues(W: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of WᵀW in ascending order, float64, from the Gram matrix on W's smaller side
    (``min(m, n)`` values; ``W`` is any tensor viewed as ``(shape[0], prod(rest))``)."""
    if W.dim() < 2:
        raise ValueError(f"W: expected a matrix (>= 2-D tensor), got shape {tuple(W.shape)}")
    M = W.detach().reshape(W.shape[0], math.prod(W.shape[1:])).to(torch.float64)
    if M.numel() == 0:
        return torch.zeros(0, dtype=torch.float64, device=M.device)
    gram = M.T @ M if M.shape[0] >= M.shape[1] else M @ M.T
    return torch.linalg.eigvalsh(gram).clamp_min(0.0)


def fit_power_law(evals: torch.Tensor, min_tail: Optional[int] = None) -> tuple[float, float, float, int]:
    """Clauset–Shalizi–Newman fit of a continuous power law to the upper tail of ``evals``.

    Args:
        evals: 1-D positive values (any order, float64 recommended).
        min_tail: fewest values a candidate tail may hold (default ``min(10, max(2, N // 2))``):
            the KS distance of a handful of points is small by chance, so tiny tails would win.

    Returns:
        (alpha, xmin, ks_distance, num_tail); alpha is NaN when there are too few values.
    """
    x = torch.sort(evals.to(torch.float64).flatten()).values
    N = int(x.numel())
    if min_tail is None:
        min_tail = min(10, max(2, N // 2))
    if N < max(2, min_tail):
        return math.nan, math.nan, math.nan, 0
    logx = torch.log(x)
    # suffix[k] = Σ_{j >= k} log x_j
    suffix = torch.flip(torch.cumsum(torch.flip(logx, [0]), 0), [0])
    # Candidates: first index of each distinct value, leaving >= min_tail values in the tail.
    first = torch.ones(N, dtype=torch.bool, device=x.device)
    first[1:] = x[1:] > x[:-1]
    first[N - min_tail + 1:] = False
    cand = torch.nonzero(first).flatten()
    if cand.numel() == 0:
        return math.nan, math.nan, math.nan, 0
    best = (math.inf, math.nan, math.nan, 0)
    ranks = torch.arange(N, dtype=torch.float64, device=x.device)
    for c0 in range(0, cand.numel(), _CHUNK):
        ks = cand[c0:c0 + _CHUNK]
        n = (N - ks).to(torch.float64)  # tail sizes
        denom = suffix[ks] - n * logx[ks]  # Σ log(x_j / x_min) over the tail
        alpha = 1.0 + n / denom.clamp_min(1e-300)
        # Fitted CDF of every x_j under every candidate: P = 1 - (x_j / x_min)^(1 - alpha).
        ratio = (logx[None, :] - logx[ks][:, None]).clamp_min(0.0)
        P = 1.0 - torch.exp((1.0 - alpha)[:, None] * ratio)
        pos = ranks[None, :] - ks[:, None].to(torch.float64)  # j's index within the tail
        inside = pos >= 0
        upper = (pos + 1.0) / n[:, None]
        lower = pos / n[:, None]
        gap = torch.maximum((upper - P).abs(), (lower - P).abs())
        D = torch.where(inside, gap, torch.zeros_like(gap)).amax(dim=1)
        D = torch.where(torch.isfinite(alpha), D, torch.full_like(D, math.inf))
        i = int(torch.argmin(D))
        if float(D[i]) < best[0]:
            best = (float(D[i]), float(alpha[i]), float(x[ks[i]]), int(N - ks[i]))
    D, alpha, xmin, ntail = best
    if not math.isfinite(D):
        return math.nan, math.nan, math.nan, 0
    return alpha, xmin, D, ntail


def spectral_stats(W: torch.Tensor, min_tail: Optional[int] = None) -> SpectralStats:
    """HT-SR statistics of ``W`` (any device/dtype; computed in float64).

    Args:
        W: a (m, n) matrix (or a >= 2-D weight, viewed as (shape[0], prod(rest))).
        min_tail: see :func:`fit_power_law`.
    """
    if W.dim() >= 2 and not bool(torch.isfinite(W.detach()).all()):
        # A diverged run: report NaN (the trainer's loss check names the problem) instead of
        # failing inside eigvalsh with a convergence error.
        nan = math.nan
        return SpectralStats(nan, nan, nan, 0, 0, nan, nan, nan, nan)
    return stats_from_eigenvalues(eigenvalues(W), min_tail)


def stats_from_eigenvalues(lam: torch.Tensor, min_tail: Optional[int] = None) -> SpectralStats:
    """:func:`spectral_stats` from the ascending eigenvalues of WᵀW (as :func:`eigenvalues` returns)."""
    lam_max = float(lam[-1]) if lam.numel() else 0.0
    nonzero = lam[lam > _ZERO_RTOL * lam_max] if lam_max > 0 else lam[:0]
    alpha, xmin, D, ntail = fit_power_law(nonzero, min_tail)
    stable = float(lam.sum()) / lam_max if lam_max > 0 else 0.0
    weighted = alpha * math.log10(lam_max) if lam_max > 0 and math.isfinite(alpha) else math.nan
    return SpectralStats(
        alpha=alpha, xmin=xmin, ks_distance=D, num_tail=ntail, num_evals=int(nonzero.numel()),
        lambda_max=lam_max, spectral_norm=math.sqrt(lam_max), stable_rank=stable, alpha_weighted=weighted,
    )


def esd_alpha(W: torch.Tensor, min_tail: Optional[int] = None) -> float:
    """The power-law exponent α of the ESD of WᵀW (see :func:`spectral_stats`)."""
    return spectral_stats(W, min_tail).alpha
