"""Test matrices with known spectra and the float64 reference ``U S^p V^T`` (REFERENCE.md)."""

from __future__ import annotations

import torch

from htmuon_dist.spectral.accuracy import random_orthonormal, reference, rel_err  # noqa: F401

SPECTRA = ("gaussian", "inverse", "spike_bulk", "logspaced", "rank_deficient")
SCALES = (1e-6, 1e-3, 1.0, 1e3)


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


def reference_power(x: torch.Tensor, power: float, rtol: float) -> torch.Tensor:
    """``U S^p V^T`` of exactly ``x`` (float64 SVD), singular values <= rtol*max dropped."""
    return reference(x, power, rtol)[0]
