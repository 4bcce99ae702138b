"""Exact spectral powers: the float64 SVD (the definition) and the Gram-matrix eigendecomposition.

Both take a batch ``(b, m, n)`` with ``m >= n`` in any float dtype; ``svd`` returns float64,
``eigh`` float32 (float64 for float64 input).
Singular values at or below ``rtol * sigma_max`` (per matrix) count as zero and map to zero.
"""

from __future__ import annotations

import torch

from .cutoff import threshold
from .registry import SpectralMethod, register_method


def _powered(sigma: torch.Tensor, exponent: float, rtol: float) -> torch.Tensor:
    """``sigma ** exponent`` above the cutoff, else 0; sigma is (b, k) >= 0.

    ``rtol`` is a :class:`.cutoff.Cutoff` (the default rounding-noise rule, ``sigma <=
    max(rel sigma_max, fro ||sigma||_2)`` is cut) or a plain float (``sigma <= rtol sigma_max``).
    """
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


# Row chunk of the Gram accumulation and of the final product: the float64 copy of a chunk
# stays below this size.
GRAM_CHUNK_BYTES = 32 << 20


def _chunk_rows(x: torch.Tensor) -> int:
    b, _, n = x.shape
    return max(1, GRAM_CHUNK_BYTES // (8 * n * max(b, 1)))


def gram64(x: torch.Tensor) -> torch.Tensor:
    """``x^T x`` in float64, accumulated over row chunks: (b, m, n), any float dtype and
    strides -> (b, n, n) float64, with no float64 copy of the whole matrix."""
    b, m, n = x.shape
    rows = _chunk_rows(x)
    gram = torch.zeros(b, n, n, dtype=torch.float64, device=x.device)
    for start in range(0, m, rows):
        chunk = x[:, start : start + rows].to(torch.float64)
        gram.baddbmm_(chunk.mT, chunk)
    return gram


def eigh_power(x: torch.Tensor, power: float, rtol: float) -> torch.Tensor:
    """``M (M^T M)^{(p-1)/2}`` through the eigendecomposition of the (n, n) Gram matrix.

    (b, m, n) with m >= n -> (b, m, n), float32 (float64 for float64 input).

    Precision without matrix-sized float64 memory: the Gram matrix is accumulated in float64
    over row chunks, because squaring doubles the condition number (in float32 a singular
    value below about 3e-4 of the largest would be lost; 1e-2 in bfloat16); the final product
    ``M · (V f(Λ) V^T)`` also runs chunk by chunk in float64 and is stored in float32. A
    float32 product would cost ``eps32 · (σ_max/σ_min)^(1-p)`` relative error in the small
    directions (measured 1e-5 drift between otherwise equal runs on a 3 x 16 matrix); on
    H100/H200 float64 tensor cores run at the plain-float32 rate. Workspace: O(n^2) float64
    plus two float64 row chunks (:data:`GRAM_CHUNK_BYTES`).
    """
    out_dtype = torch.promote_types(x.dtype, torch.float32)
    lam, v = torch.linalg.eigh(gram64(x))
    sigma = lam.clamp_min(0).sqrt()
    # sigma^(p-1) on kept directions: M v_i = sigma_i u_i, so M v_i sigma_i^(p-1) = sigma_i^p u_i.
    scale = _powered(sigma, power - 1.0, rtol)
    k = (v * scale.unsqueeze(-2)) @ v.mT  # V f(Λ) V^T, (b, n, n) float64
    b, m, n = x.shape
    if x.mT.is_contiguous() and not x.is_contiguous():
        # x is the transposed view of a wide matrix: store the result in the caller's layout.
        y = torch.empty(b, n, m, dtype=out_dtype, device=x.device).mT
    else:
        y = torch.empty(b, m, n, dtype=out_dtype, device=x.device)
    rows = _chunk_rows(x)
    for start in range(0, m, rows):
        y[:, start : start + rows] = x[:, start : start + rows].to(torch.float64) @ k
    return y


def svd_cost(m: int, n: int) -> float:
    # Golub-Kahan bidiagonalisation 4mn^2 - 4n^3/3, QR sweeps ~ 12 n^3 for the vectors,
    # the final product 2mn^2; float64 (counted x2 against float32 matmul throughput).
    return 2.0 * (4.0 * m * n * n - 4.0 * n**3 / 3.0 + 12.0 * n**3 + 2.0 * m * n * n)


def svd_workspace(m: int, n: int) -> float:
    # float64 copy of the matrix, U (m, n) and the product, plus (n, n) factors.
    return 24.0 * m * n + 32.0 * n * n


def eigh_workspace(m: int, n: int) -> float:
    # Gram, eigenvectors, LAPACK work, V D and V D V^T in float64: ~6 (n, n) float64
    # matrices, plus a float64 row chunk and its product.
    return 48.0 * n * n + 2.0 * GRAM_CHUNK_BYTES


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
        workspace=svd_workspace,
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
        workspace=eigh_workspace,
    )
)
