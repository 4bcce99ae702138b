"""Fast spectral powers: ``"gram_rr"`` (fp32 Gram eigh + one Rayleigh–Ritz refinement) and ``"auto"``.

Both take a batch ``(b, m, n)`` with ``m >= n`` in any float dtype and return float32; singular
values at or below ``rtol * sigma_max`` (per matrix) map to zero, as in :mod:`.exact`.

``auto`` picks per device and shape from the measured table shipped as package data
(:mod:`.auto_table`, written by ``benchmarks/spectral.py --write-table``): the fastest method
that met the accuracy bar there, or the exact ``eigh`` where the device has no measurements.

``gram_rr`` keeps every matrix-sized product in float32 and does float64 work only on n x n
matrices. Where float64 matmuls are fast (CPUs, H100) it is slower than the exact ``eigh`` (it
needs two eighs, measured 0.85-2.3x the time of ``eigh`` on this project's shared 2-core CPU);
it is meant for devices whose float64 matmul rate is a small fraction of float32 (consumer
GPUs), where ``eigh``'s float64 Gram and products dominate. Not measured on such a device yet.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import auto_table
from .exact import _powered
from .registry import SpectralMethod, get_method, method_workspace, register_method


def gram_rr_power(x: torch.Tensor, power: float, rtol: float) -> torch.Tensor:
    """``U Σ^p V^T`` from an fp32 Gram eigendecomposition refined by one Rayleigh–Ritz step.

    (b, m, n) with m >= n, any float dtype -> (b, m, n) float32.

    Precisions and why:
      1. ``G = X^T X`` and ``eigh(G)`` in float32 give ``W0``, accurate for directions with
         ``sigma > ~3e-4 sigma_max`` (squaring doubles the condition number); below that the
         columns of ``W0`` are an arbitrary basis of the right *subspace* (the gap to the large
         singular values keeps the subspace accurate).
      2. ``Y = X W0`` (float32) has column norms ~ sigma_i, and ``C = Y^T Y`` (float32) is nearly
         diagonal with every entry accurate *relative to its own row and column norms*; its
         eigendecomposition must be float64 (an fp32 eigh again resolves only eps * ||C||, and
         measured 15% error on a log-spaced spectrum), which rotates the small directions into
         place: ``W = W0 R``, ``U Σ = Y R``, ``sigma^2 = eig(C)``.
      3. ``O = (Y R) diag(sigma^(p-1)) W^T`` in float32.
    Measured against the float64 SVD: <= 5e-5 relative error on all test spectra for n <= 512
    (the exact methods' 1e-4 bound), but not proven for larger n, so it is registered as
    approximate. The input is scaled by its max-abs entry first so that the fp32 Gram neither
    overflows nor underflows at any scale; the scale is folded back as ``s^p``.
    No ``.item()`` and no data-dependent Python branches (safe for CUDA streams/graphs).
    """
    xf = x.to(torch.float32)
    scale = xf.abs().amax(dim=(-2, -1), keepdim=True)
    nonzero = scale > 0
    scale = torch.where(nonzero, scale, torch.ones_like(scale))  # a zero matrix stays zero
    xf = xf / scale
    gram = xf.mT @ xf
    _, w0 = torch.linalg.eigh(gram)
    y = xf @ w0
    c = (y.mT @ y).to(torch.float64)
    c = 0.5 * (c + c.mT)  # rounding makes Y^T Y slightly non-symmetric; eigh reads one triangle
    lam, r = torch.linalg.eigh(c)
    r32 = r.to(torch.float32)
    w = w0 @ r32
    us = y @ r32  # columns sigma_i u_i
    sigma = lam.clamp_min(0).sqrt().to(torch.float32)
    coeff = _powered(sigma, power - 1.0, rtol)
    out = (us * coeff.unsqueeze(-2)) @ w.mT
    return out * scale.pow(power)


def gram_rr_cost(m: int, n: int) -> float:
    # fp32: Gram, X W0, Y^T Y, Y R, final product 2mn^2 each, W0 R 2n^3, eigh ~9n^3;
    # the float64 eigh of C counts x2 against fp32 throughput.
    return 10.0 * m * n * n + 2.0 * n**3 + 9.0 * n**3 + 2.0 * 9.0 * n**3


def auto_explain(device_type: str, m: int, n: int, index: Optional[int] = None,
                 power: Optional[float] = None) -> tuple[str, str]:
    """(method, why) of :func:`auto_choice`: ``why`` names the measured run that decided
    (shape, power, device, time) or why the documented rule applies."""
    key = auto_table.device_key(device_type, index)
    rule, reason = auto_table.rule_with_reason(device_type, m, n, power)
    return auto_table.choose(key, m, n, rule=rule, power=power, rule_reason=reason)


def auto_choice(device_type: str, m: int, n: int, index: Optional[int] = None,
                power: Optional[float] = None) -> str:
    """Method name ``"auto"`` uses for one (m, n) matrix on ``device_type`` (device ``index``)
    at ``power``: the fastest that met the bar in the measured table (:mod:`.auto_table`; at the
    largest measured power <= ``power``), else
    the documented rule (on CUDA ``log_ns`` for m/n >= 2, and near square for p >= 1/8;
    ``eigh`` elsewhere: :func:`.auto_table.rule_method`). Without a power, the choice for p
    unknown (near square: ``eigh``)."""
    return auto_explain(device_type, m, n, index, power)[0]


def auto_power(x: torch.Tensor, power: float, rtol: float) -> torch.Tensor:
    """Dispatches on device, shape and power (host metadata only, no sync). (b, m, n) -> float32."""
    name = auto_choice(x.device.type, x.size(-2), x.size(-1), x.device.index, power)
    return get_method(name).fn(x, power, rtol).to(torch.float32)


def auto_plan_choice(m: int, n: int, power: Optional[float] = None) -> str:
    """The method the planner costs ``auto`` as: the CUDA rule's for the shape and power. Every
    rank must make the same plan, so this is one fixed method, not a per-device lookup (ranks
    could see different devices), and the balance matters on GPU clusters."""
    return auto_table.rule_method("cuda", m, n, power)


def auto_cost(m: int, n: int) -> float:
    """FLOPs of :func:`auto_plan_choice` without a power (see registry.cost for the units)."""
    return get_method(auto_plan_choice(m, n)).cost(m, n)


def auto_workspace(m: int, n: int) -> float:
    """The larger workspace of the two methods the rule picks between (the exact RULE_METHOD and
    the CUDA fast method), whatever the device and power."""
    names = (auto_table.RULE_METHOD, auto_table.rule_method("cuda"))
    return max(method_workspace(name, m, n) for name in names)


register_method(
    SpectralMethod(
        name="gram_rr",
        fn=gram_rr_power,
        cost=gram_rr_cost,
        exact=False,
        powers="any",
        description=(
            "approximate: fp32 Gram eigh + fp64 Rayleigh-Ritz on n x n, fp32 products "
            "(<=5e-5 measured)"
        ),
    )
)
register_method(
    SpectralMethod(
        name="auto",
        fn=auto_power,
        cost=auto_cost,
        exact=False,
        powers="any",
        description="fastest method meeting the HTMuon accuracy bar for the device, shape and power",
        workspace=auto_workspace,
        chooser=auto_plan_choice,
    )
)
