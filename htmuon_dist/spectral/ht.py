"""``"ht"``: the reference's ``htmuon_ht``, the prescribed spectrum ``U diag(i^-p) V^T``.

The i-th largest singular value (1-based rank, descending order) is replaced by ``i^-p``: the
update depends on the *order* of the singular values, not their size. It is a different map
from HTMuon's ``σ^p`` (36-58% from it, REFERENCE.md) and scale-free: ``f(cM) = f(M)``, not
``c^p f(M)``; p = 0 gives the polar factor. Directions under the rank cutoff get 0 and do not
take a rank (the reference has no cutoff, so rounding noise of a rank-deficient matrix receives
ranks r+1, r+2, ... with weights (r+1)^-p...). Computed from a float64 SVD (the reference: float32).
"""

from __future__ import annotations

import torch

from .exact import svd_cost
from .registry import SpectralMethod, register_method


def ht_power(x: torch.Tensor, power: float, rtol: float) -> torch.Tensor:
    """``U diag(i^-p) V^T`` over the kept directions. (b, m, n), m >= n -> (b, m, n) float64."""
    from .cutoff import threshold

    u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    keep = s > threshold(s, rtol)  # s is descending, so the kept ones are ranks 1..r
    rank = torch.arange(1, s.size(-1) + 1, dtype=torch.float64, device=s.device)
    d = torch.where(keep, rank.pow(-float(power)), torch.zeros_like(s))
    return (u * d.unsqueeze(-2)) @ vh


register_method(
    SpectralMethod(
        name="ht",
        fn=ht_power,
        cost=svd_cost,
        exact=False,  # not U Σ^p V^T; exact for its own formula
        powers="any",
        description="the reference's htmuon_ht: prescribed spectrum U diag(i^-p) V^T (rank, not size)",
        target="rank_power",
    )
)
