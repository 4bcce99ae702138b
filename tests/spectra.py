"""Test matrices with known spectra and an independent float64 reference ``U S^p V^T``
(REFERENCE.md), written here from ``torch.linalg.svd`` alone: nothing in this file comes from
``htmuon_dist`` (its ``spectral.accuracy`` reference, ``threshold`` and ``default_rtol`` are what
the tests check, so they cannot also be the oracle). The cutoffs are literals:

* ``rtol`` a float: singular values ``<= rtol * sigma_max`` are dropped;
* :func:`noise_rtol` (the "rounding noise" rule for data rounded to ``eps``): a value is
  dropped when ``<= max(1.2e-7 * sigma_max, eps * (sqrt(m) + sqrt(n)) / sqrt(m n) * ||S||_F)``,
  i.e. below the 2-norm of an (m, n) matrix of rounding errors of relative size ``eps``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SPECTRA = ("gaussian", "inverse", "spike_bulk", "logspaced", "rank_deficient")
SCALES = (1e-6, 1e-3, 1.0, 1e3)
FLOAT32_EPS = 1.1920928955078125e-07  # 2**-23
SIGMA_MAX_FLOOR = 1.2e-7


@dataclass(frozen=True)
class NoiseRtol:
    """Drop singular values <= max(rel * sigma_max, fro * ||S||_F)."""

    rel: float
    fro: float


def noise_rtol(m: int, n: int, eps: float = FLOAT32_EPS) -> NoiseRtol:
    return NoiseRtol(SIGMA_MAX_FLOOR, eps * (math.sqrt(m) + math.sqrt(n)) / math.sqrt(m * n))


def random_orthonormal(rows: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """(rows, k) float64 with orthonormal columns (QR of a Gaussian, signs fixed)."""
    q, r = torch.linalg.qr(torch.randn(rows, k, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def rel_err(y: torch.Tensor, r: torch.Tensor) -> float:
    """||y - r||_F / ||r||_F in float64 (||y||_F when r is zero)."""
    denom = float(torch.linalg.vector_norm(r.double()))
    num = float(torch.linalg.vector_norm(y.double() - r.double()))
    return num / denom if denom > 0 else num


def make_matrix(kind: str, m: int, n: int, seed: int = 0) -> torch.Tensor:
    """A float64 (m, n) matrix with the named spectrum and sigma_max about 1."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    if kind == "gaussian":
        x = torch.randn(m, n, dtype=torch.float64, generator=g)
        return x / torch.linalg.matrix_norm(x, ord=2)
    if kind == "inverse":
        s = 1.0 / torch.arange(1, k + 1, dtype=torch.float64)
    elif kind == "spike_bulk":
        s = torch.full((k,), 0.05, dtype=torch.float64) + 0.01 * torch.rand(k, generator=g, dtype=torch.float64)
        s[0] = 1.0
    elif kind == "logspaced":
        s = torch.logspace(0, -4, k, dtype=torch.float64)
    elif kind == "rank_deficient":
        s = torch.zeros(k, dtype=torch.float64)
        r = max(1, k // 3)
        s[:r] = torch.linspace(1.0, 0.1, r, dtype=torch.float64)
    else:
        raise ValueError(kind)
    u = random_orthonormal(m, k, g)
    v = random_orthonormal(n, k, g)
    return (u * s) @ v.T


def reference_power(x: torch.Tensor, power: float, rtol: "float | NoiseRtol") -> torch.Tensor:
    """``U S^p V^T`` of exactly ``x`` (m, n) in float64, from its SVD; the singular values at or
    below the cutoff (see the module doc) are dropped, i.e. get 0 instead of ``s**p``."""
    u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    smax = float(s.max()) if s.numel() else 0.0
    if isinstance(rtol, NoiseRtol):
        cut = max(rtol.rel * smax, rtol.fro * float(torch.linalg.vector_norm(s)))
    else:
        cut = float(rtol) * smax
    sp = torch.tensor([v ** power if v > cut else 0.0 for v in s.tolist()], dtype=torch.float64)
    return (u * sp) @ vh
