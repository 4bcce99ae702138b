"""Matrix functions ``U f(Σ) V^T`` of a matrix or a batch of matrices.

``spectral_power(M, p)`` is HTMuon's core: ``U Σ^p V^T`` for ``M = U Σ V^T``. Methods live in
their own modules and register in :mod:`.registry`; this module resolves shapes, dtypes and
the rank cutoff, then calls the method on a ``(b, m, n)``, ``m >= n`` batch.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import exact as _exact  # noqa: F401  (registers "svd", "eigh")
from . import newton_schulz as _newton_schulz  # noqa: F401  (registers "ns5")
from . import tracked_ns as _tracked_ns  # noqa: F401  (registers "tracked_ns")
from . import fast as _fast  # noqa: F401  (registers "gram_rr", "auto")
from . import gram32 as _gram32  # noqa: F401  (registers "gram32")
from . import auto_table  # noqa: F401  (auto's measured table)
from .fast import auto_choice
from .newton_schulz import newton_schulz5
from .registry import SpectralMethod, available_methods, get_method, method_cost, register_method

__all__ = [
    "spectral_power",
    "newton_schulz5",
    "default_rtol",
    "available_methods",
    "get_method",
    "method_cost",
    "register_method",
    "SpectralMethod",
    "validate_power",
    "auto_choice",
]

# Rounding a matrix to a dtype perturbs its singular values by up to about eps * sigma_max
# (measured here: 0.07-0.7 eps for rank-deficient fp32/bf16 products and LayerNorm-style
# gradients; tests/test_spectral.py checks such matrices against the cutoff),
# so directions below a few eps are indistinguishable from rounding noise; with p > 0 they would
# still get weight (eps)^p, e.g. 0.13 at fp32 and 0.55 at bf16.
RTOL_EPS_MULTIPLE = 4.0


def default_rtol(dtype: torch.dtype) -> float:
    """Relative singular-value cutoff for inputs of ``dtype``: ``4 * finfo(dtype).eps``.

    float32: 4.8e-7, bfloat16: 3.1e-2, float16: 3.9e-3, float64: 8.9e-16.
    """
    return RTOL_EPS_MULTIPLE * torch.finfo(dtype).eps


def validate_power(power: float, name: str = "power") -> float:
    """Returns ``power`` as a float or raises ValueError naming ``name`` and the valid range."""
    try:
        value = float(power)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1], got {power!r}") from None
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(
            f"{name} must be in [0, 1] (0 = Muon's polar factor, 0.125 = the paper's HTMuon, "
            f"1 = the momentum itself), got {power!r}"
        )
    return value


def spectral_power(
    M: torch.Tensor,
    power: float,
    method: str = "eigh",
    rtol: Optional[float] = None,
) -> torch.Tensor:
    """``U Σ^p V^T`` for ``M = U Σ V^T``.

    Args:
        M: (m, n) or (b, m, n), floating point, any device.
        power: p in [0, 1]. 0 gives the polar factor ``U V^T`` (Muon); 1 gives ``M``.
        method: a registered method name, see :func:`available_methods` ("svd", "eigh", "ns5"...).
        rtol: singular values ``<= rtol * sigma_max`` (per matrix) count as zero and map to
            zero. Default :func:`default_rtol` of ``M.dtype``.

    Returns:
        Tensor of M's shape and dtype. A zero matrix gives zeros. Non-finite input gives
        non-finite output (the optimizer checks gradients before calling this).
    """
    if not torch.is_tensor(M) or not M.is_floating_point():
        raise TypeError(f"M must be a floating-point tensor, got {type(M).__name__} "
                        f"{getattr(M, 'dtype', '')}")
    if M.ndim not in (2, 3):
        raise ValueError(f"M must be (m, n) or (b, m, n), got shape {tuple(M.shape)}")
    power = validate_power(power)
    spec = get_method(method)
    if spec.powers == "zero" and power != 0.0:
        raise ValueError(
            f"method {method!r} only orthogonalises (power 0), got power={power}; "
            f"use an HTMuon method such as 'eigh' or 'svd' for power > 0"
        )
    if rtol is None:
        rtol = default_rtol(M.dtype)
    elif not (math.isfinite(rtol) and 0.0 <= rtol < 1.0):
        raise ValueError(f"rtol must be in [0, 1), got {rtol!r}")

    batched = M.unsqueeze(0) if M.ndim == 2 else M
    if 0 in batched.shape:
        return torch.zeros_like(M)
    wide = batched.size(-2) < batched.size(-1)
    x = batched.mT if wide else batched  # methods see m >= n
    y = spec.fn(x, power, float(rtol))
    y = y.mT if wide else y
    y = y.to(M.dtype)
    return y[0] if M.ndim == 2 else y


# After spectral_power exists: grouped.py calls it.
from .grouped import spectral_power_groups  # noqa: E402

__all__ += ["spectral_power_groups"]
