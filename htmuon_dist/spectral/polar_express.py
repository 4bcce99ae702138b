"""``"polar_express"``: Muon's polar factor ``≈ U V^T`` by the Polar Express schedule (power 0 only).

Polar Express (Amsel, Persson, Musco, Gower, arXiv 2505.16932) keeps NS5's structure, one odd
quintic ``p_k(x) = a_k x + b_k x^3 + c_k x^5`` applied to the singular values per step, but
changes the coefficients every step: ``p_k`` is the minimax (equioscillating) odd quintic that
maps the interval ``[lo_k, hi_k]`` the singular values are known to lie in closest to 1, and the
image of that interval is the next one. Greedy per-step minimax is optimal for the composition
(the paper's theorem), so the same five steps as NS5 end in a narrower band.

The coefficients are derived here, in float64 on the host, by the Remez exchange algorithm
(:func:`minimax_quintic`) with the paper's two finite-precision measures:

* cushion: each step is fitted on ``[max(lo, CUSHION hi), hi]`` rather than ``[lo, hi]``
  (a polynomial fitted down to 1e-3 would be too steep to evaluate in bf16), then rescaled so
  that ``p(lo) + p(hi) = 2``;
* safety: every step but the last is evaluated at ``x / SAFETY`` (SAFETY = 1.01), and the input
  is scaled by ``1 / (SAFETY ||X||_F)``, so rounding that pushes a singular value slightly above
  the fitted interval cannot blow up.

With ``ell = 1e-3`` (relative to ``||X||_F``) these reproduce the paper's published first steps
(8.28721, -23.5959, 17.3004), (4.10706, -2.94785, 0.544843), ... to 1e-12
(tests/test_polar_express.py). In exact arithmetic every singular value ``sigma >= ell ||X||_F``
ends in :func:`band` = [0.846, 1.124] after 5 steps (NS5: [0.47, 1.20] on the same range,
[0.68, 1.20] above 2e-3); bf16 rounding widens both by about 0.01-0.03.

Precision: every product through :func:`.precision.mm` in bf16 operands with float32
accumulation on accelerators (what NS5 runs in; on the ``meta`` device too, so the cost counter
of benchmarks/gpu_cost.py sees bf16), float32 on CPUs (whose bf16 matmuls are slow; pass
``dtype=torch.bfloat16`` to emulate the GPU there). Cost: exactly NS5's, ``steps (4 m n^2 + 2
n^3)`` FLOPs. No host sync, no data-dependent branch.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional

import torch

from .newton_schulz import ns5_cost
from .precision import mm
from .registry import SpectralMethod, register_method

CUSHION = 0.02407327424182761  # the paper's lower limit of each fit, relative to hi
SAFETY = 1.01
ELL = 1e-3  # smallest singular value (relative to ||X||_F) the schedule is built to lift
STEPS = 5  # NS5's step count: the same cost as Muon's NS5


def minimax_quintic(lo: float, hi: float, tol: float = 1e-15) -> tuple[float, float, float, float]:
    """The odd quintic ``a x + b x^3 + c x^5`` closest to 1 in max norm on ``[lo, hi]``, and its
    error E: by the Remez exchange on the four alternation points lo < q < r < hi, where the error
    ``1 - p`` is +E, -E, +E, -E (q, r: the roots of p'). Float64 on the host."""
    if not 0.0 <= lo <= hi:
        raise ValueError(f"minimax_quintic needs 0 <= lo <= hi, got lo={lo}, hi={hi}")
    if lo >= hi * (1.0 - 5e-6):  # a point interval: the classical Newton-Schulz quintic at hi
        return 15.0 / 8.0 / hi, -10.0 / 8.0 / hi**3, 3.0 / 8.0 / hi**5, 0.0
    q, r = lo + (hi - lo) / 4.0, lo + 3.0 * (hi - lo) / 4.0
    err_prev = math.inf
    for _ in range(100):
        pts = (lo, q, r, hi)
        lhs = torch.tensor([[x, x**3, x**5, s] for x, s in zip(pts, (1.0, -1.0, 1.0, -1.0))],
                           dtype=torch.float64)
        a, b, c, err = torch.linalg.solve(lhs, torch.ones(4, dtype=torch.float64)).tolist()
        root = math.sqrt(max(9.0 * b * b - 20.0 * a * c, 0.0))  # p'(x) = a + 3b x^2 + 5c x^4
        q, r = (math.sqrt((-3.0 * b - root) / (10.0 * c)), math.sqrt((-3.0 * b + root) / (10.0 * c)))
        if abs(err - err_prev) <= tol:
            break
        err_prev = err
    return a, b, c, abs(err)


@lru_cache(maxsize=16)
def schedule(ell: float = ELL, steps: int = STEPS) -> tuple[tuple[float, float, float], ...]:
    """Per-step coefficients ``(a_k, b_k, c_k)`` for singular values in ``[ell, 1]`` (before the
    safety scaling, which :func:`polar_express` applies)."""
    if not 0.0 < ell < 1.0 or steps < 1:
        raise ValueError(f"schedule needs 0 < ell < 1 and steps >= 1, got ell={ell}, steps={steps}")
    lo, hi = ell, 1.0
    out = []
    for _ in range(steps):
        a, b, c, _ = minimax_quintic(max(lo, CUSHION * hi), hi)
        # fitted above the cushion: recentre so that the images of lo and hi straddle 1 evenly
        scale = 2.0 / (_p((a, b, c), lo) + _p((a, b, c), hi))
        a, b, c = a * scale, b * scale, c * scale
        out.append((a, b, c))
        lo = _p((a, b, c), lo)
        hi = 2.0 - lo
    return tuple(out)


def _p(coef: tuple[float, float, float], x):
    a, b, c = coef
    return a * x + b * x**3 + c * x**5


def _applied(ell: float, steps: int) -> list[tuple[float, float, float]]:
    """The coefficients as evaluated: every step but the last at ``x / SAFETY``."""
    coefs = list(schedule(ell, steps))
    for k in range(steps - 1):
        a, b, c = coefs[k]
        coefs[k] = (a / SAFETY, b / SAFETY**3, c / SAFETY**5)
    return coefs


def scalar_map(s: torch.Tensor, ell: float = ELL, steps: int = STEPS) -> torch.Tensor:
    """What the iteration does to a singular value ``s`` given relative to ``||X||_F`` (exact
    arithmetic, float64): the input scaling and all steps."""
    x = s.double() / SAFETY
    for coef in _applied(ell, steps):
        x = _p(coef, x)
    return x


def band(ell: float = ELL, steps: int = STEPS, points: int = 20001) -> tuple[float, float]:
    """(min, max) of :func:`scalar_map` over ``s`` in ``[ell, 1]`` (a dense log grid)."""
    y = scalar_map(torch.logspace(math.log10(ell), 0.0, points, dtype=torch.float64), ell, steps)
    return float(y.min()), float(y.max())


def polar_express(
    x: torch.Tensor, steps: int = STEPS, ell: float = ELL, dtype: Optional[torch.dtype] = None,
    eps: float = 1e-7,
) -> torch.Tensor:
    """Approximate polar factor ``≈ U V^T`` of ``x`` (m, n) or (b, m, n), any orientation.

    Args:
        x: input, any float dtype.
        steps, ell: the schedule (:func:`schedule`); 5 steps cost exactly NS5.
        dtype: operand precision of every product (float32 accumulation): default bfloat16 on any
            device but the CPU (``meta`` included), float32 on the CPU.
        eps: added to the norm so that a zero matrix returns zeros.

    Returns:
        float32 tensor of x's shape.
    """
    if dtype is None:
        dtype = torch.float32 if x.device.type == "cpu" else torch.bfloat16
    y = x.to(torch.float32)
    wide = y.size(-2) < y.size(-1)
    if wide:
        y = y.mT  # iterate on the side whose Gram matrix is smaller: y is tall, A = y^T y
    y = y / (SAFETY * y.norm(dim=(-2, -1), keepdim=True) + eps)
    for a, b, c in _applied(ell, steps):
        gram = mm(y.mT, y, dtype)
        poly = b * gram + c * mm(gram, gram, dtype)
        y = a * y + mm(y, poly, dtype)
    return y.mT if wide else y


def _polar_express_fn(x: torch.Tensor, power: float, rtol: float) -> torch.Tensor:
    return polar_express(x)


register_method(
    SpectralMethod(
        name="polar_express",
        fn=_polar_express_fn,
        cost=ns5_cost,
        exact=False,
        powers="zero",
        description="Muon with Polar Express: per-step minimax quintics (power 0 only, approximate; "
                    "bf16 on GPUs, NS5's cost)",
        # float32 iterate, its bf16 copies, the product and the sum; (n, n) Gram, square, polynomial
        workspace=lambda m, n: 16.0 * m * n + 16.0 * n * n,
    )
)
