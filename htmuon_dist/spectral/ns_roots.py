"""``"ns_roots"``: the reference's ``htmuon_ns`` route, NS5 polar factor x NS square roots of the Gram.

``O = NS5(M) (M^T M)^{p/2}``: Muon's quintic Newton–Schulz gives ``≈ U V^T``, and ``k + 1``
coupled Newton–Schulz square roots of the (n, n) Gram matrix give ``(M^T M)^{2^-(k+1)} =
V Σ^p V^T`` for ``p = 2^-k``; the product is ``≈ U Σ^p V^T``. Matmul-only and cheap, but not a
faithful HTMuon: NS5's singular values lie in ~[0.68, 1.2] rather than at 1, and five square-root
steps converge only for Gram eigenvalues near the largest (an eigenvalue ``λ`` of the normalised
Gram needs ~log_1.5(1/sqrt(λ)) steps), so small directions are off. Measured error against the
exact update: docs/spectral.md and benchmarks/results/variants_cpu.txt.

What differs from the reference, on purpose:
* the power must be 0 or 2^-k; anything else is a ValueError (the reference rounds
  ``log_{1/2}(p)`` silently, so p = 0.2 ran as 0.25);
* the regulariser added to the Gram matrix is relative, ``(tau / ||M||_F)^2 ||M||_F^2 I`` with
  ``tau`` the rank cutoff, instead of an absolute 1e-6 (which made the method 1.2 off at
  gradients x 1e-3): the method is scale-equivariant, ``f(cM) = c^p f(M)``;
* no absolute ``eps I`` after each root and no absolute clamp of the norms (same reason);
* float32 throughout on every device (the reference runs NS5 in bf16 on GPUs).
"""

from __future__ import annotations

import math

import torch

from .newton_schulz import newton_schulz5, ns5_cost
from .registry import SpectralMethod, check_power, register_method

NS_STEPS = 5  # NS5 steps and square-root steps, as in the reference


def _ns_sqrt(s: torch.Tensor, eye: torch.Tensor, steps: int) -> torch.Tensor:
    """Coupled Newton–Schulz square root of symmetric PSD ``s`` (b, n, n), normalised by its
    Frobenius norm first (eigenvalues in (0, 1]); no absolute epsilons."""
    alpha = torch.linalg.matrix_norm(s)[..., None, None]
    alpha = torch.where(alpha > 0, alpha, torch.ones_like(alpha))
    y = s / alpha
    z = eye.expand_as(y)
    for _ in range(steps):
        t = 3.0 * eye - z @ y
        y = 0.5 * (y @ t)
        z = 0.5 * (t @ z)
    root = alpha.sqrt() * y
    return 0.5 * (root + root.mT)


def ns_roots_power(x: torch.Tensor, power: float, rtol: float) -> torch.Tensor:
    """``NS5(M) (M^T M + delta I)^{p/2}``. (b, m, n) with m >= n -> (b, m, n) float32.

    ``power`` must be 0 or 2^-k. ``delta = (c ||M||_F)^2`` with ``c = max(rtol, rtol.fro)``,
    the rank cutoff relative to ``||M||_F`` (a soft cutoff: directions well below it get weight
    about ``(c ||M||_F)^p`` from the roots and little from NS5).
    """
    check_power("ns_roots", power)
    xf = x.to(torch.float32)
    fro = torch.linalg.matrix_norm(xf)[..., None, None]
    nonzero = fro > 0
    fro = torch.where(nonzero, fro, torch.ones_like(fro))  # a zero matrix stays zero
    xn = xf / fro  # every epsilon below is relative to ||M||_F
    polar = newton_schulz5(xn, steps=NS_STEPS, dtype=torch.float32)
    if power == 0.0:
        return polar * nonzero
    n = xn.size(-1)
    eye = torch.eye(n, dtype=torch.float32, device=xn.device)
    rel = max(float(rtol), getattr(rtol, "fro", 0.0))
    s = xn.mT @ xn + (rel * rel) * eye
    roots = int(round(-math.log2(power))) + 1  # (M^T M)^(2^-roots) = V Σ^p V^T
    for _ in range(roots):
        s = _ns_sqrt(s, eye, NS_STEPS)
    return (polar @ s) * fro.pow(power) * nonzero


def ns_roots_cost(m: int, n: int) -> float:
    # NS5, the Gram mn^2 (symmetric), 4 roots (p = 1/8) x 5 steps x 3 (n, n) products, final 2mn^2
    return ns5_cost(m, n) + m * n * n + 4 * NS_STEPS * 3 * 2.0 * n**3 + 2.0 * m * n * n


register_method(
    SpectralMethod(
        name="ns_roots",
        fn=ns_roots_power,
        cost=ns_roots_cost,
        exact=False,
        powers="pow2",
        description=(
            "approximate (the reference's htmuon_ns): NS5 polar x NS square roots of the Gram; "
            "p = 2^-k only; relative epsilons"
        ),
    )
)
