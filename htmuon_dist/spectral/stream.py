"""``stream``: HTMuon by one warm-started subspace-iteration step per training step.

The reference's ``htmuon_stream`` keeps a basis ``V`` per matrix across steps and does one QR
power step on the current momentum ``M_t``:

    V_t = qr(M_t^T M_t V_{t-1}),   U_t Σ_t = M_t V_t (column norms),   O = U_t Σ_t^p V_t^T.

When ``M_t`` changes slowly, ``V_t`` converges to its right singular vectors and ``O`` to the
exact update; the first steps (cold start, or after a fast change) are approximate (REFERENCE.md:
5-20% error observed). This module is the pure function; the per-matrix basis is state that its
owner keeps (like the momentum), and is not wired into the optimizer here.

Every product is float32 (about ``8 m n^2 + 4/3 n^3`` FLOPs, under half of NS5's); the QR is on
the small (n, n) side. No host sync.
"""

from __future__ import annotations

from typing import Optional

import torch

from .cutoff import Cutoff, noise_cutoff
from .exact import _powered


def stream_power(
    x: torch.Tensor,
    power: float,
    rtol: Optional[float] = None,
    basis: Optional[torch.Tensor] = None,
    eps: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One warm-started step: ``≈ U Σ^p V^T`` of ``x``, the new basis and an error estimate.

    Args:
        x: (m, n) float tensor (any float dtype; computed in float32).
        power: p in [0, 1].
        rtol: rank cutoff: a :class:`.cutoff.Cutoff`, a float (relative to sigma_max), or None
            for the rounding-noise rule of ``x.dtype`` (see :func:`htmuon_dist.spectral.default_rtol`).
        basis: (k, k) float32 with k = min(m, n), orthonormal columns: the previous step's
            basis of the smaller side (``x``'s right side when m >= n, left side otherwise), or
            None for a cold start (the identity).
        eps: machine epsilon of the data for the default cutoff (default ``finfo(x.dtype).eps``;
            2**-7 for an fp32 copy of bf16 momentum).

    Returns:
        (y, new_basis, err): y (m, n) float32; new_basis (k, k) float32 to pass next step;
        err, a 0-d float32 tensor: the RMS cosine between the columns of ``U_t`` (0 when ``V_t``
        is exactly the singular basis; the test shows the true error falls with it).
    """
    if x.ndim != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point (m, n) matrix, got {x.dtype} {tuple(x.shape)}")
    if not 0.0 <= float(power) <= 1.0:
        raise ValueError(f"power must be in [0, 1], got {power!r}")
    if rtol is None:
        rtol = noise_cutoff(x.shape, torch.finfo(x.dtype).eps if eps is None else float(eps))
    elif not isinstance(rtol, Cutoff):
        rtol = Cutoff(float(rtol))
    wide = x.size(0) < x.size(1)
    xf = (x.mT if wide else x).to(torch.float32)  # (m, n) with m >= n: V is (n, n)
    n = xf.size(1)
    if basis is None:
        basis = torch.eye(n, dtype=torch.float32, device=xf.device)
    elif basis.shape != (n, n):
        raise ValueError(
            f"basis must be ({n}, {n}) (min(m, n) of x {tuple(x.shape)}), got {tuple(basis.shape)}; "
            f"pass None to start cold (e.g. after the matrix was resharded to a new shape)"
        )
    basis = basis.to(device=xf.device, dtype=torch.float32)
    q, r = torch.linalg.qr(xf.mT @ (xf @ basis))
    # fix the signs so that the basis changes continuously between steps (QR is unique up to them)
    signs = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q.dtype)
    v = q * signs
    xv = xf @ v  # columns sigma_i u_i
    sigma = torch.linalg.vector_norm(xv, dim=0)
    coeff = _powered(sigma.unsqueeze(0), float(power) - 1.0, rtol)[0]
    y = (xv * coeff) @ v.mT
    # non-orthogonality of U = X V diag(1/sigma): exactly 0 at convergence
    safe = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
    u = xv / safe
    gram = u.mT @ u
    off = gram - torch.diag_embed(torch.diagonal(gram))
    err = torch.linalg.matrix_norm(off) / max(1, n - 1) ** 0.5 / n**0.5
    return (y.mT if wide else y), v, err
