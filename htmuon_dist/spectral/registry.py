"""The table of spectral methods: name -> how to compute ``U f(Σ) V^T`` and what it costs.

Every method takes a batch ``(b, m, n)`` with ``m >= n`` (callers transpose wide matrices) and
returns a tensor of the same shape in float32 or float64; :func:`htmuon_dist.spectral.spectral_power`
handles transposes, batching and the output dtype. Methods register themselves here so the
optimizer and the distributed planner (which needs :attr:`SpectralMethod.cost`) can find them by
name without importing each module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

# (batch (b, m, n) with m >= n, power, rtol) -> (b, m, n); rtol is already resolved from the
# caller's dtype: singular values below rtol * sigma_max count as zero.
SpectralFn = Callable[[torch.Tensor, float, float], torch.Tensor]
# (m, n) with m >= n -> FLOPs for one matrix
CostFn = Callable[[int, int], float]


@dataclass(frozen=True)
class SpectralMethod:
    """One way of computing ``U Σ^p V^T``.

    Attributes:
        name: the name users pass as ``method=``.
        fn: the computation, see the module docstring.
        cost: FLOP estimate for one (m, n) matrix with m >= n; the planner balances owners on it.
        exact: True when the result meets the exact bound of REFERENCE.md (1e-4 relative to a
            float64 SVD); False for approximations.
        powers: ``"any"`` for p in [0, 1], ``"zero"`` for methods that only orthogonalise (Muon).
        description: one line for error messages and docs.
        workspace: bytes of temporary memory for one (m, n) matrix (m >= n) beyond its input
            and its output; the exchange engine sizes its compute batches and its memory
            contract with it. Default: :func:`default_workspace`.
    """

    name: str
    fn: SpectralFn
    cost: CostFn
    exact: bool
    powers: str
    description: str
    workspace: Optional[CostFn] = None


_METHODS: dict[str, SpectralMethod] = {}


def register_method(method: SpectralMethod) -> SpectralMethod:
    """Adds ``method`` to the table; a name may be registered once."""
    if method.name in _METHODS:
        raise ValueError(f"spectral method {method.name!r} is already registered")
    if method.powers not in ("any", "zero"):
        raise ValueError(f"powers must be 'any' or 'zero', got {method.powers!r}")
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> SpectralMethod:
    """Looks a method up by name, with an error that lists the valid names."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(
            f"unknown spectral method {name!r}; choose one of {sorted(_METHODS)} "
            f"(see htmuon_dist.spectral.available_methods())"
        ) from None


def available_methods() -> dict[str, str]:
    """Name -> one-line description of every registered method."""
    return {name: m.description for name, m in sorted(_METHODS.items())}


def method_cost(name: str, m: int, n: int) -> float:
    """FLOP estimate of ``name`` on one (m, n) matrix, either orientation."""
    m, n = max(m, n), min(m, n)
    return get_method(name).cost(m, n)


def default_workspace(m: int, n: int) -> float:
    """A generous estimate for methods that do not state theirs: three float32 copies of the
    matrix plus six float64 (n, n) matrices."""
    return 12.0 * m * n + 48.0 * n * n


def method_workspace(name: str, m: int, n: int) -> float:
    """Temporary bytes of ``name`` on one (m, n) matrix, either orientation."""
    m, n = max(m, n), min(m, n)
    fn = get_method(name).workspace
    return (fn or default_workspace)(m, n)
