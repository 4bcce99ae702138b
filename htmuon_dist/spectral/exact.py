"""Exact spectral powers: the float64 SVD (the definition) and the Gram-matrix eigendecomposition.

Both take a batch ``(b, m, n)`` with ``m >= n`` in any float dtype and return float64.
Singular values at or below ``rtol * sigma_max`` (per matrix) count as zero and map to zero.
"""

from __future__ import annotations

import torch

from .registry import SpectralMethod, register_method


def _powered(sigma: torch.Tensor, exponent: float, rtol: float) -> torch.Tensor:
    """``sigma ** exponent`` above the cutoff, else 0; sigma is (b, k) >= 0.

    ``rtol`` is a :class:`.cutoff.Cutoff` (the default rounding-noise rule, ``sigma <=
    max(rel sigma_max, fro ||sigma||_2)`` is cut) or a plain float (``sigma <= rtol sigma_max``).
    """
    from .cutoff import threshold  # imported here to keep this edit inside _powered (merge)

    cutoff = threshold(sigma, rtol)
    keep = sigma > cutoff  # strict: a zero matrix keeps nothing, so 0 ** negative never happens
    safe = torch.where(keep, sigma, torch.ones_like(sigma))
    return torch.where(keep, safe.pow(exponent), torch.zeros_like(sigma))


def svd_power(x: torch.Tensor, power: float, rtol: float) -> torch.Tensor:
    """``U Σ^p V^T`` from a float64 thin SVD. (b, m, n) -> (b, m, n) float64.

    The definition of HTMuon's update; slow on GPUs (iterative, poorly batched) but exact to
    float64 rounding for every spectrum.
    """
    u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    return (u * _powered(s, power, rtol).unsqueeze(-2)) @ vh


def eigh_power(x: torch.Tensor, power: float, rtol: float) -> torch.Tensor:
    """``M (M^T M)^{(p-1)/2}`` through the eigendecomposition of the (n, n) Gram matrix.

    (b, m, n) with m >= n -> (b, m, n) float64. The Gram matrix is formed in float64 because
    squaring doubles the condition number: in float32 a singular value below about 3e-4 of the
    largest would be lost in rounding (and 1e-2 in bfloat16).
    """
    xd = x.double()
    gram = xd.mT @ xd
    lam, v = torch.linalg.eigh(gram)
    sigma = lam.clamp_min(0).sqrt()
    # sigma^(p-1) on kept directions: M v_i = sigma_i u_i, so M v_i sigma_i^(p-1) = sigma_i^p u_i.
    scale = _powered(sigma, power - 1.0, rtol)
    # M (V D V^T): one (n, n) product and one (m, n) product, instead of two (m, n) ones
    return xd @ ((v * scale.unsqueeze(-2)) @ v.mT)


def svd_cost(m: int, n: int) -> float:
    # Golub-Kahan bidiagonalisation 4mn^2 - 4n^3/3, QR sweeps ~ 12 n^3 for the vectors,
    # the final product 2mn^2; float64 (counted x2 against float32 matmul throughput).
    return 2.0 * (4.0 * m * n * n - 4.0 * n**3 / 3.0 + 12.0 * n**3 + 2.0 * m * n * n)


def eigh_cost(m: int, n: int) -> float:
    # Gram mn^2 (symmetric), eigh ~ 9n^3, V D V^T 2n^3, M (V D V^T) 2mn^2; float64 (x2).
    return 2.0 * (m * n * n + 9.0 * n**3 + 2.0 * n**3 + 2.0 * m * n * n)


register_method(
    SpectralMethod(
        name="svd",
        fn=svd_power,
        cost=svd_cost,
        exact=True,
        powers="any",
        description="exact: float64 thin SVD, U diag(S^p) V^T (the definition; slowest)",
    )
)
register_method(
    SpectralMethod(
        name="eigh",
        fn=eigh_power,
        cost=eigh_cost,
        exact=True,
        powers="any",
        description="exact: eigendecomposition of the float64 Gram matrix on the smaller side",
    )
)
