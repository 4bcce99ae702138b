"""``stream``: HTMuon by one warm-started subspace-iteration step per training step.

The reference's ``htmuon_stream`` keeps a basis ``V`` per matrix across steps and does one QR
power step on the current momentum ``M_t``:

    V_t = qr(M_t^T M_t V_{t-1}),   U_t Σ_t = M_t V_t (column norms),   O = U_t Σ_t^p V_t^T.

When ``M_t`` changes slowly, ``V_t`` converges to its right singular vectors and ``O`` to the
exact update; the first steps (cold start, or after a fast change) are approximate (REFERENCE.md:
5-20% error observed; docs/spectral.md has ours).

State: the basis of the smaller side, k = min(m, n), a (k, k) float32 matrix per matrix. The
optimizer stores it sharded exactly like the parameter (the first k² entries of a float32
tensor shaped like it, row-major; the rest stay zero), so checkpoints and resharding treat it
like the momentum, and the exchange engine carries each rank's part of it to the owner and
back (docs/distributed.md). An all-zero basis means "cold": the identity is used.

Every product is float32: five (m, n)·(n, n)-sized products, a thin QR of an (m, n) and of an
(n, n) matrix, about ``14 m n^2 + 2 n^3`` FLOPs, 0.8-1.2x NS5's time on a CPU
(benchmarks/results/variants_cpu.txt). No host sync.
"""

from __future__ import annotations

from typing import Optional

import torch

from .cutoff import Cutoff, noise_cutoff
from .exact import _powered
from .registry import SpectralMethod, register_method


def _signed_q(factored: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Q of a thin QR from ``torch.geqrf``'s output, with R's diagonal made >= 0: unique, so
    the basis changes continuously from one step to the next. Taking geqrf's output (not the
    matrix) lets the caller's product be freed before Q is formed: two (m, n) at a time."""
    h, tau = factored
    n = h.size(-1)
    signs = torch.where(torch.diagonal(h[..., :n, :], dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(h.dtype)
    return torch.linalg.householder_product(h, tau).mul_(signs.unsqueeze(-2))


def _stream_step(xf: torch.Tensor, power: float, rtol: float, basis: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The step on a (b, m, n) float32 batch with m >= n and a (b, n, n) float32 basis (all
    zero = cold). Returns (y (b, m, n), new basis (b, n, n), err (b,)), all float32.

    Temporaries: at most two (m, n) float32 matrices at once besides ``xf`` (the first QR's
    input and its factors, then its factors and Q, then X V and y); everything else is (n, n)."""
    n = xf.size(-1)
    eye = torch.eye(n, dtype=xf.dtype, device=xf.device)
    cold = basis.abs().amax(dim=(-2, -1), keepdim=True) == 0  # no host sync: a mask
    basis = torch.where(cold, eye, basis)
    # qr(X^T X V) in two halves, qr(X^T qr(X V).Q): the same Q (X^T Q1 = X^T X V R1^-1, and a
    # right factor that is upper triangular leaves Q unchanged), but each half has X's condition
    # number, not its square: forming X^T X V in float32 lets 1e-7 of gradient noise move the
    # update by 1e-3 (tests/test_stream_sharded.py).
    q1 = _signed_q(torch.geqrf(xf @ basis))
    v = _signed_q(torch.geqrf(xf.mT @ q1))
    del q1
    xv = xf @ v  # columns sigma_i u_i
    sigma = torch.linalg.vector_norm(xv, dim=-2)  # (b, n)
    coeff = _powered(sigma, float(power) - 1.0, rtol)
    # non-orthogonality of U = X V diag(1/sigma), from the (n, n) Gram of X V: 0 at convergence
    inv = torch.where(sigma > 0, sigma, torch.ones_like(sigma)).reciprocal()
    gram = (xv.mT @ xv) * inv.unsqueeze(-1) * inv.unsqueeze(-2)
    off = gram - torch.diag_embed(torch.diagonal(gram, dim1=-2, dim2=-1))
    err = torch.linalg.matrix_norm(off) / (max(1, n - 1) ** 0.5 * n**0.5)
    y = xv @ (coeff.unsqueeze(-1) * v.mT)  # X V diag(sigma^(p-1)) V^T
    return y, v, err


def stream_power(
    x: torch.Tensor,
    power: float,
    rtol: Optional[float] = None,
    basis: Optional[torch.Tensor] = None,
    eps: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One warm-started step: ``≈ U Σ^p V^T`` of ``x``, the new basis and an error estimate.

    Args:
        x: (m, n) or (b, m, n) float tensor (any float dtype; computed in float32).
        power: p in [0, 1].
        rtol: rank cutoff: a :class:`.cutoff.Cutoff`, a float (relative to sigma_max), or None
            for the rounding-noise rule of ``x.dtype`` (see :func:`htmuon_dist.spectral.default_rtol`).
        basis: (k, k) or (b, k, k) with k = min(m, n), orthonormal columns: the previous step's
            basis of the smaller side (``x``'s right side when m >= n, left side otherwise);
            None, or an all-zero matrix, for a cold start (the identity).
        eps: machine epsilon of the data for the default cutoff (default ``finfo(x.dtype).eps``;
            2**-7 for an fp32 copy of bf16 momentum).

    Returns:
        (y, new_basis, err): y like x in float32; new_basis (…, k, k) float32 to pass next
        step; err, float32 of the batch shape (0-d for one matrix): the RMS cosine between the
        columns of ``U_t`` (0 when ``V_t`` is exactly the singular basis; the test shows the true
        error falls with it).
    """
    if x.ndim not in (2, 3) or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point (m, n) or (b, m, n) tensor, got {x.dtype} {tuple(x.shape)}")
    if not 0.0 <= float(power) <= 1.0:
        raise ValueError(f"power must be in [0, 1], got {power!r}")
    if rtol is None:
        rtol = noise_cutoff(x.shape, torch.finfo(x.dtype).eps if eps is None else float(eps))
    elif not isinstance(rtol, Cutoff):
        rtol = Cutoff(float(rtol))
    batched = x if x.ndim == 3 else x.unsqueeze(0)
    wide = batched.size(-2) < batched.size(-1)
    xf = (batched.mT if wide else batched).to(torch.float32)  # m >= n: V is (n, n)
    b, n = xf.size(0), xf.size(-1)
    if basis is None:
        basis = torch.zeros(b, n, n, dtype=torch.float32, device=xf.device)
    else:
        if basis.shape[-2:] != (n, n) or basis.ndim != x.ndim:
            want = (n, n) if x.ndim == 2 else (b, n, n)
            raise ValueError(
                f"basis must be {want} (min(m, n) of x {tuple(x.shape)}), got {tuple(basis.shape)}; "
                f"pass None to start cold (e.g. after the matrix was resharded to a new shape)"
            )
        basis = (basis if basis.ndim == 3 else basis.unsqueeze(0)).to(device=xf.device, dtype=torch.float32)
    y, v, err = _stream_step(xf, power, rtol, basis)
    y = y.mT if wide else y
    if x.ndim == 2:
        return y[0], v[0], err[0]
    return y, v, err


def stream_state_numel(m: int, n: int) -> int:
    """Float32 values of the per-matrix state: the (k, k) basis, k = min(m, n)."""
    k = min(m, n)
    return k * k


def stream_step(x: torch.Tensor, power: float, rtol: float, state: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The registry's stateful form: x (b, m, n) with m >= n, state (b, n·n) float32 (zeros =
    cold) -> (y (b, m, n) float32, new state (b, n·n) float32, err (b,) float32)."""
    b, _, n = x.shape
    y, v, err = _stream_step(x.to(torch.float32), power, rtol, state.view(b, n, n))
    return y, v.reshape(b, n * n), err


def _cold(x: torch.Tensor, power: float, rtol: float) -> torch.Tensor:
    """Without state (``spectral_power(..., method="stream")``): one step from the identity."""
    b, _, n = x.shape
    zeros = torch.zeros(b, n * n, dtype=torch.float32, device=x.device)
    return stream_step(x, power, rtol, zeros)[0]


register_method(
    SpectralMethod(
        name="stream",
        fn=_cold,
        cost=lambda m, n: 14.0 * m * n * n + 2.0 * n**3,
        exact=False,
        powers="any",
        description="the reference's htmuon_stream: one warm-started QR power step per "
                    "training step (its basis is optimizer state; without state: cold)",
        # two (m, n) float32 temporaries (see _stream_step), the (n, n) ones and the basis
        workspace=lambda m, n: 8.0 * m * n + 48.0 * n * n,
        state_numel=stream_state_numel,
        stateful=stream_step,
    )
)
