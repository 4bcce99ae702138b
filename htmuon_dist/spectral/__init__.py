"""Matrix functions ``U f(Σ) V^T`` of a matrix or a batch of matrices.

``spectral_power(M, p)`` is HTMuon's core: ``U Σ^p V^T`` for ``M = U Σ V^T``. Methods live in
their own modules and register in :mod:`.registry`; this module resolves shapes, dtypes and
the rank cutoff, then calls the method on a ``(b, m, n)``, ``m >= n`` batch.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from . import exact as _exact  # noqa: F401  (registers "svd", "eigh")
from . import newton_schulz as _newton_schulz  # noqa: F401  (registers "ns5")
from . import polar_express as _polar_express  # noqa: F401  (registers "polar_express")
from . import tracked_ns as _tracked_ns  # noqa: F401  (registers "tracked_ns")
from . import fast_ns as _fast_ns  # noqa: F401  (registers "fast_ns")
from . import log_ns as _log_ns  # noqa: F401  (registers "log_ns")
from . import fast as _fast  # noqa: F401  (registers "gram_rr", "auto")
from . import ns_roots as _ns_roots  # noqa: F401  (registers "ns_roots")
from . import ht as _ht  # noqa: F401  (registers "ht")
from . import stream as _stream  # noqa: F401  (registers "stream")
from .cutoff import Cutoff, noise_cutoff
from . import gram32 as _gram32  # noqa: F401  (registers "gram32")
from . import auto_table  # noqa: F401  (auto's measured table)
from .fast import auto_choice, auto_explain
from .newton_schulz import newton_schulz5
from .registry import (
    SpectralMethod,
    available_methods,
    check_power,
    get_method,
    method_cost,
    method_workspace,
    register_method,
    state_numel,
)

__all__ = [
    "spectral_power",
    "stateful_power",
    "newton_schulz5",
    "default_rtol",
    "Cutoff",
    "available_methods",
    "get_method",
    "method_cost",
    "method_workspace",
    "state_numel",
    "register_method",
    "check_power",
    "SpectralMethod",
    "validate_power",
    "auto_choice",
    "auto_explain",
]

# The default cutoff follows the input's rounding noise (derivation in .cutoff and
# docs/spectral.md): singular values <= max(FLOOR sigma_max,
# NOISE_MULTIPLE eps ||M||_F (sqrt(m) + sqrt(n)) / sqrt(mn)) map to zero. With p > 0 a kept noise
# direction would get weight (noise)^p, e.g. 0.4 at bf16, so the cut matters; a fixed multiple of
# eps sigma_max (the former 4 eps) removed half of the real directions of bf16 momentum.


def default_rtol(dtype: torch.dtype, shape: Sequence[int], eps: Optional[float] = None) -> Cutoff:
    """Default rank cutoff of an (..., m, n) matrix ``shape`` whose data had dtype ``dtype``.

    Args:
        dtype: the dtype the values were rounded to (sets eps unless ``eps`` is given).
        shape: the matrix shape; only the last two sizes matter.
        eps: machine epsilon of the data, default ``torch.finfo(dtype).eps``.

    Returns:
        A :class:`Cutoff` (a float equal to its ``sigma_max``-relative floor, 1.2e-7, with a
        Frobenius-relative part ``fro``): for bf16 (m = n = 1024) ``fro`` = 4.9e-4, i.e. at most
        0.016 sigma_max (flat spectrum) and typically ~1e-3 sigma_max.
    """
    if eps is None:
        eps = torch.finfo(dtype).eps
    if not (math.isfinite(eps) and 0.0 <= eps < 1.0):
        raise ValueError(f"eps must be a machine epsilon in [0, 1) (bf16: 7.8e-3), got {eps!r}")
    if len(shape) < 2:
        raise ValueError(f"shape must be (..., m, n), got {tuple(shape)}")
    return noise_cutoff(shape, eps)


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


def _resolve_cutoff(M: torch.Tensor, rtol: Optional[float], eps: Optional[float]) -> Cutoff:
    if rtol is None:
        return default_rtol(M.dtype, M.shape, eps)
    if isinstance(rtol, Cutoff):
        return rtol
    if not (math.isfinite(rtol) and 0.0 <= rtol < 1.0):
        raise ValueError(f"rtol must be in [0, 1), got {rtol!r}")
    return Cutoff(float(rtol))


def spectral_power(
    M: torch.Tensor,
    power: float,
    method: str = "eigh",
    rtol: Optional[float] = None,
    eps: Optional[float] = None,
) -> torch.Tensor:
    """``U Σ^p V^T`` for ``M = U Σ V^T``.

    Args:
        M: (m, n) or (b, m, n), floating point, any device.
        power: p in [0, 1]. 0 gives the polar factor ``U V^T`` (Muon); 1 gives ``M``.
        method: a registered method name, see :func:`available_methods` ("svd", "eigh", "ns5"...).
        rtol: explicit cutoff: singular values ``<= rtol * sigma_max`` (per matrix) count as
            zero and map to zero. Default: the rounding-noise rule of :func:`default_rtol`.
        eps: machine epsilon of the data ``M`` came from, for the default rule (ignored when
            ``rtol`` is given). Default ``torch.finfo(M.dtype).eps``; pass bf16's 2**-7 when ``M``
            is an fp32 copy of bf16 values (e.g. momentum that travelled in bf16).

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
    check_power(method, power)
    cutoff = _resolve_cutoff(M, rtol, eps)

    batched = M.unsqueeze(0) if M.ndim == 2 else M
    if 0 in batched.shape:
        return torch.zeros_like(M)
    wide = batched.size(-2) < batched.size(-1)
    x = batched.mT if wide else batched  # methods see m >= n
    y = spec.fn(x, power, cutoff)
    y = y.mT if wide else y
    y = y.to(M.dtype)
    return y[0] if M.ndim == 2 else y


def stateful_power(
    M: torch.Tensor,
    power: float,
    method: str,
    state: torch.Tensor,
    rtol: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A stateful method (``stream``) on a batch, with its per-matrix state.

    Args:
        M: (b, m, n), floating point.
        power, method, rtol: as in :func:`spectral_power` (the default cutoff follows M.dtype).
        state: (b, state_numel(method, m, n)) float32, all zero for a matrix without state yet.

    Returns:
        (y (b, m, n) in M's dtype, new state like ``state``, err (b,) float32: the method's own
        estimate of its error).
    """
    spec = get_method(method)
    if spec.stateful is None:
        raise ValueError(f"method {method!r} keeps no state; use spectral_power")
    power = validate_power(power)
    cutoff = _resolve_cutoff(M, rtol, None)
    wide = M.size(-2) < M.size(-1)
    y, new_state, err = spec.stateful(M.mT if wide else M, power, cutoff, state)
    return (y.mT if wide else y).to(M.dtype), new_state, err


# After spectral_power exists: grouped.py calls it.
from .grouped import spectral_power_groups  # noqa: E402

__all__ += ["spectral_power_groups"]
