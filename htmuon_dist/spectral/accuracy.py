"""The HTMuon accuracy bar and the spectra it is checked on (used by tests and benchmarks).

Bar: ``||Y - R|| / ||R|| <= 0.25 * min_c ||c P - R|| / ||R||`` with ``R = U Σ^p V^T`` and
``P = U V^T`` from a float64 SVD of exactly the tensor a method sees, with the same rank cutoff
(``default_rtol(dtype, shape)``, the rounding-noise rule) applied to both: an approximation must be four times closer to
HTMuon than the best rescaled Muon update is.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import default_rtol
from .cutoff import threshold

SPECTRA = ("gaussian", "inv_i", "spike_bulk", "logspace", "rank_fp32", "rank_bf16")


def random_orthonormal(rows: int, k: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(rows, k, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def make_matrix(kind: str, m: int, n: int, scale: float, seed: int) -> torch.Tensor:
    """A (m, n) matrix with spectrum ``kind`` (one of SPECTRA) and Frobenius norm ``scale``.

    float32, except ``rank_bf16`` (bfloat16): a rank-min(m,n)/4 product computed in the
    storage dtype, whose rounding noise must fall under that dtype's cutoff and map to zero.
    """
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    if kind == "gaussian":
        mat = torch.randn(m, n, generator=gen, dtype=torch.float64)
    elif kind in ("rank_fp32", "rank_bf16"):
        r = max(1, k // 4)
        dt = torch.bfloat16 if kind == "rank_bf16" else torch.float32
        a = torch.randn(m, r, generator=gen).to(dt)
        b = torch.randn(n, r, generator=gen).to(dt)
        prod = (a @ b.T).double()
        return (prod / prod.norm() * scale).to(dt)
    else:
        i = torch.arange(1, k + 1, dtype=torch.float64)
        if kind == "inv_i":
            s = 1.0 / i
        elif kind == "spike_bulk":
            s = 1.0 + 0.1 * torch.rand(k, generator=gen, dtype=torch.float64)
            s[:3] *= torch.tensor([100.0, 30.0, 10.0], dtype=torch.float64)
        elif kind == "logspace":
            s = torch.logspace(0, -4, k, dtype=torch.float64)
        else:
            raise ValueError(f"unknown spectrum {kind!r}; choose one of {SPECTRA}")
        mat = (random_orthonormal(m, k, gen) * s) @ random_orthonormal(n, k, gen).T
    return (mat / mat.norm() * scale).to(torch.float32)


def reference(
    mat: torch.Tensor, power: float, rtol: Optional[float] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, P) in float64 from the SVD of ``mat`` (m, n), with the dtype's rank cutoff
    (``rtol``: a float relative to sigma_max, or a :class:`.cutoff.Cutoff`)."""
    u, s, vh = torch.linalg.svd(mat.double(), full_matrices=False)
    cut = default_rtol(mat.dtype, mat.shape) if rtol is None else rtol
    keep = s > threshold(s, cut)
    safe = torch.where(keep, s, torch.ones_like(s))
    sp = torch.where(keep, safe.pow(power), torch.zeros_like(s))
    return (u * sp) @ vh, (u * keep.double()) @ vh


def bar(r: torch.Tensor, p: torch.Tensor) -> float:
    """0.25 x the relative distance of the best rescaled polar factor ``c P`` from ``R``."""
    c = (p * r).sum() / (p * p).sum().clamp_min(1e-300)
    return 0.25 * float((c * p - r).norm() / r.norm())


def rel_err(y: torch.Tensor, r: torch.Tensor) -> float:
    """||y - r|| / ||r|| in float64 (||y|| when r is zero)."""
    denom = r.double().norm()
    num = (y.double() - r.double()).norm()
    return float(num / denom) if denom > 0 else float(num)
