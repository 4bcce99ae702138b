"""The table of spectral methods: name -> how to compute ``U f(Σ) V^T`` and what it costs.

Every method takes a batch ``(b, m, n)`` with ``m >= n`` (callers transpose wide matrices) and
returns a tensor of the same shape in float32 or float64; :func:`htmuon_dist.spectral.spectral_power`
handles transposes, batching and the output dtype. Methods register themselves here so the
optimizer and the distributed planner (which needs :attr:`SpectralMethod.cost`) can find them by
name without importing each module.
"""

from __future__ import annotations

import math
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
        powers: ``"any"`` for p in [0, 1], ``"zero"`` for methods that only orthogonalise (Muon),
            ``"pow2"`` for p in {0} U {2^-k, k >= 0} (repeated square roots).
        description: one line for error messages and docs.
        workspace: bytes of temporary memory for one (m, n) matrix (m >= n) beyond its input
            and its output; the exchange engine sizes its compute batches and its memory
            contract with it. Default: :func:`default_workspace`.
        target: ``"sigma_power"`` when the method computes (or approximates) ``U Σ^p V^T``;
            ``"rank_power"`` for the reference's prescribed spectrum ``U diag(i^-p) V^T``, a
            different update that the HTMuon accuracy bar does not apply to.
        state_numel: for methods that carry state from one step to the next (``stream``): the
            float32 values of one (m, n) matrix's state (m >= n; at most m·n, so the optimizer
            can store it in a tensor shaped like the parameter). None: stateless.
        stateful: the method with its state: ``(x (b, m, n) with m >= n, power, rtol, state
            (b, state_numel) float32, all zero = none yet) -> (y (b, m, n), new state, err
            (b,) float32)``; ``fn`` is then its form without state.
        cuts_noise: True when singular values under the rank cutoff (the rounding-noise rule of
            :mod:`.cutoff` by default) map to zero, so that directions which rounding created in
            a rank-deficient matrix get no weight. False for a method that keeps them: ``auto``
            never picks it, and tests/test_cutoff.py's rank-deficient cases do not apply to it.
        chooser: for a method that runs another one (``auto``): ``(m, n, power or None) ->``
            the name of the method the planner should cost it as; :func:`method_cost` then
            returns that method's cost.
    """

    name: str
    fn: SpectralFn
    cost: CostFn
    exact: bool
    powers: str
    description: str
    workspace: Optional[CostFn] = None
    target: str = "sigma_power"
    state_numel: Optional[CostFn] = None
    stateful: Optional[Callable] = None
    cuts_noise: bool = True
    chooser: Optional[Callable[[int, int, Optional[float]], str]] = None


_METHODS: dict[str, SpectralMethod] = {}


def register_method(method: SpectralMethod) -> SpectralMethod:
    """Adds ``method`` to the table; a name may be registered once."""
    if method.name in _METHODS:
        raise ValueError(f"spectral method {method.name!r} is already registered")
    if method.powers not in ("any", "zero", "pow2"):
        raise ValueError(f"powers must be 'any', 'zero' or 'pow2', got {method.powers!r}")
    if method.target not in ("sigma_power", "rank_power"):
        raise ValueError(f"target must be 'sigma_power' or 'rank_power', got {method.target!r}")
    if (method.state_numel is None) != (method.stateful is None):
        raise ValueError("a stateful method needs both state_numel and stateful")
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


def method_cost(name: str, m: int, n: int, power: Optional[float] = None) -> float:
    """FLOP estimate of ``name`` on one (m, n) matrix, either orientation, at ``power`` (only a
    method with a ``chooser`` (``auto``) depends on it)."""
    m, n = max(m, n), min(m, n)
    spec = get_method(name)
    if spec.chooser is not None:
        spec = get_method(spec.chooser(m, n, power))
    return spec.cost(m, n)


def default_workspace(m: int, n: int) -> float:
    """A generous estimate for methods that do not state theirs: three float32 copies of the
    matrix plus six float64 (n, n) matrices."""
    return 12.0 * m * n + 48.0 * n * n


def method_workspace(name: str, m: int, n: int) -> float:
    """Temporary bytes of ``name`` on one (m, n) matrix, either orientation."""
    m, n = max(m, n), min(m, n)
    fn = get_method(name).workspace
    return (fn or default_workspace)(m, n)
def is_power_of_two_root(power: float) -> bool:
    """True for p = 0 and p = 2^-k (k = 0, 1, 2, ...): what ``powers="pow2"`` methods compute."""
    if power == 0.0:
        return True
    if not 0.0 < power <= 1.0:
        return False
    k = -math.log2(power)
    return abs(k - round(k)) < 1e-12 and round(k) <= 52


def check_power(name: str, power: float) -> None:
    """Raises ValueError when method ``name`` cannot compute ``power`` (call at construction)."""
    spec = get_method(name)
    if spec.powers == "zero" and power != 0.0:
        raise ValueError(
            f"method {name!r} only orthogonalises (power 0), got power={power}; "
            f"use an HTMuon method such as 'eigh' or 'svd' for power > 0"
        )
    if spec.powers == "pow2" and not is_power_of_two_root(power):
        raise ValueError(
            f"method {name!r} computes only powers 0 and 2^-k (1, 0.5, 0.25, 0.125, ...) by "
            f"repeated square roots, got power={power}; it is never rounded to the nearest one: "
            f"pass such a power or use 'eigh' for any power"
        )


def state_numel(name: str, m: int, n: int) -> int:
    """Float32 state values that method ``name`` keeps for one (m, n) matrix (0: stateless)."""
    fn = get_method(name).state_numel
    return int(fn(max(m, n), min(m, n))) if fn is not None else 0
