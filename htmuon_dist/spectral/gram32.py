"""``"gram32"``: float32 Gram and eigendecomposition, float64 only for the matrices that need it.

The exact ``eigh`` forms the Gram matrix ``MᵀM`` and decomposes it in float64, because squaring
doubles the condition number. Most of that precision is only needed for ill-conditioned
matrices: an fp32 ``eigh`` of the fp32 Gram resolves each eigenvalue to about
``eps32 · λ_max``, so ``λ_i^((p-1)/2)`` is off by about ``(1-p)/2 · eps32 · λ_max / λ_i``.
Measured against the float64 SVD (n = 256..1024, p = 1/8), the relative error of the whole
update is ≲ 1.5 · eps32 · λ_max / λ_min: 1.4e-6 at λ_min/λ_max = 0.09, 1.5e-5 at 9e-4, 2e-4 at
1e-4, 1.8e-3 for the spike+bulk test spectrum at 8e-5.

So each matrix of the batch is first done in float32, and its own smallest eigenvalue decides:
``λ_min ≥ KAPPA_MIN · λ_max`` (1e-3: σ_min ≥ 3% of σ_max, error ≲ 2e-4, under a tenth of the
tightest bar in docs/spectral.md) keeps the float32 result; any other matrix (ill-conditioned,
rank-deficient, or with rounding-level eigenvalues) is recomputed by the exact float64 ``eigh``.

Costs: one host sync per call (which matrices fell back); float32 matmuls must be IEEE float32
(TF32 would put 5e-4 relative noise into the Gram): they are forced to "highest" precision
inside the call. On CPUs and H100/H200 (whose float64 matmul is as fast as float32) it saves
little; it is for GPUs whose float64 rate is a small fraction of float32 and for
well-conditioned momenta. ``benchmarks/spectral.py`` times it on a well-conditioned input and
on one that falls back; ``auto`` uses the slower of the two.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

import torch

from .exact import _powered, eigh_power
from .registry import SpectralMethod, register_method

KAPPA_MIN = 1e-3  # smallest λ_min / λ_max (per matrix) that float32 handles within ~2e-4

_precision_lock = threading.Lock()
_precision_users = 0
_precision_saved = "highest"


@contextmanager
def ieee_fp32_matmuls() -> Iterator[None]:
    """IEEE float32 matmuls (no TF32) while any caller is inside; re-entrant across threads
    (spectral_power_groups runs several calls at once), restores the user's setting after."""
    global _precision_users, _precision_saved
    with _precision_lock:
        if _precision_users == 0:
            _precision_saved = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision("highest")
        _precision_users += 1
    try:
        yield
    finally:
        with _precision_lock:
            _precision_users -= 1
            if _precision_users == 0:
                torch.set_float32_matmul_precision(_precision_saved)


def gram32_power(x: torch.Tensor, power: float, rtol: float) -> torch.Tensor:
    """``U Σ^p V^T`` via a float32 Gram ``eigh``; float64 ``eigh`` for ill-conditioned matrices.

    (b, m, n) with m >= n, any float dtype -> (b, m, n) float32.
    """
    xf = x.to(torch.float32)
    # Max-abs scaling keeps the fp32 Gram away from overflow/underflow at any input scale.
    scale = xf.abs().amax(dim=(-2, -1), keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    xs = xf / scale
    with ieee_fp32_matmuls():
        gram = xs.mT @ xs
        lam, w = torch.linalg.eigh(gram)
        sigma = lam.clamp_min(0).sqrt()
        coeff = _powered(sigma, power - 1.0, rtol)
        out = (xs @ ((w * coeff.unsqueeze(-2)) @ w.mT)) * scale.pow(power)
    lam_max = lam[..., -1]
    # A zero matrix (lam_max = 0) is exact in float32 (all zeros): no fallback needed.
    ill = (lam[..., 0] < KAPPA_MIN * lam_max) & (lam_max > 0)
    if bool(ill.any()):  # the one host sync: which matrices need float64
        idx = ill.nonzero().squeeze(-1)
        out[idx] = eigh_power(x[idx], power, rtol).to(torch.float32)
    return out


def gram32_cost(m: int, n: int) -> float:
    # float32: Gram mn^2, eigh ~9n^3, W D W^T 2n^3, X (W D W^T) 2mn^2 (the well-conditioned case).
    return m * n * n + 9.0 * n**3 + 2.0 * n**3 + 2.0 * m * n * n


register_method(
    SpectralMethod(
        name="gram32",
        fn=gram32_power,
        cost=gram32_cost,
        exact=False,
        powers="any",
        description=(
            "float32 Gram eigh; float64 eigh only for matrices with lambda_min < 1e-3 lambda_max "
            "(<= ~2e-4 relative)"
        ),
    )
)
