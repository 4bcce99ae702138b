"""``"tracked_ns"``: HTMuon's ``U Σ^p V^T`` from matrix products only, with a proven error bound.

The idea. A Newton–Schulz-type iteration ``X_{k+1} = X_k h(X_k^T X_k)`` multiplies every
singular value by ``h(s_k^2)``: ``s_{k+1} = s_k h(s_k^2)``, so after ``J`` steps
``s_J = s_0 * prod_k h(s_k^2)``. If the iteration lifts every ``s_0 >= ell`` into a narrow band
around 1, then ``s_0^p = s_J^p * prod_k h(s_k^2)^(-p)``, and every factor on the right is a smooth
function of a matrix the iteration already has:

* ``h(y)^(-p)`` is approximated by a low-degree polynomial ``g(y)`` (``h`` stays in
  [0.62, 2.6], so ``h^(-p)`` is smooth and a quadratic fits it to ~2e-4 at p = 1/8);
* on the final band ``y = s_J^2 in [0.55, 1.44]``, ``y^((p-1)/2)`` is approximated by a
  Chebyshev series ``f(y)`` of degree 7-10 that also vanishes near ``y = 0``: that is the rank
  cutoff, which keeps rounding-noise directions out.

So ``T = X_J f(G_J) prod_k g(G_k)`` with ``G_k = X_k^T X_k``; all the ``g(G_k)`` and ``f(G_J)``
are polynomials in commuting (n, n) matrices. In exact arithmetic the result is exactly
``U F(Σ/c) c^p V^T`` for a known scalar function ``F``, and :func:`schedule` evaluates
``max |F(s)/s^p - 1|`` over ``s in [ell, 1]`` on a dense grid: that number is the method's
error bound for every matrix whose kept singular values lie in ``[ell c, c]`` (relative
Frobenius error of the update <= the bound, plus rounding). ``c = ||G_0^2||_F^{1/4}`` is an
upper bound of ``sigma_max`` (Schatten-8 norm; at most ``n^{1/8} sigma_max``) that costs nothing:
the first step needs ``G_0^2`` anyway.

Precision: float32 throughout. Rounding enters every step's ``G_k`` and the accumulated product
has no self-correction. Measured by emulation (``benchmarks/tracked_ns_precision.py``): with
10-bit operands (TF32/fp16) the method meets the bar except on rank-deficient fp32 matrices
(51x over): rounding re-creates the null directions the fp32 cutoff removes, and the lift then
gives them weight. 7-bit operands (bf16) fail on most spectra. ``f`` is evaluated as a Chebyshev
series: in monomials its coefficients reach 1e3 and amplify rounding 100x or more. On CUDA,
leave float32 matmuls at IEEE precision (PyTorch's default): ``allow_tf32`` or
``set_float32_matmul_precision("high")`` turn them into the 10-bit case above.

Cost: ``(J + 1) (4 m n^2 + 4 n^3)`` FLOPs plus a few (n, n) products for ``f``; ``J = 12`` for
``ell = 1e-5``. That is about 3x Muon's NS5 FLOPs at 1B/7B shapes, measured 2.4-3.9x NS5 on CPU.
All of it is large batched matmuls (95% of the time in ``bmm``), with no eigendecomposition and
no host sync.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch

from .registry import SpectralMethod, register_method

# The step polynomial p(s) = s h(s^2), h(y) = a + b y + c y^2. Chosen by a search over quintics
# for the fewest steps at a small fit error: slope a = 2.6 at zero (the lift per step), h >= 0.62
# on [0, 1.44] (so h^(-p) stays smooth), and p maps [0, 1.2] into [0, 1.2] (self-consistent
# range); its attractor is the band s in [0.748, 1.200]. Muon's own quintic (3.4445, -4.775,
# 2.0315) lifts faster but leaves h^(-p) 10x harder to fit (measured 1.7% vs 2e-4 per step).
STEP = (2.59759, -2.03677, 0.46197)
BAND = (0.74, 1.2)  # a direction counts as lifted once s_k is in this band
MIN_ELL = 1e-5  # below this (relative to c) directions are attenuated, see schedule()
# f also zeroes the directions below ell / cut_factor(ell): 8 for a coarse cutoff (bf16 rounding
# noise is only 6-60x below rtol), 64 for a fine one (float32 noise sits >100x below MIN_ELL).
COARSE_ELL = 1e-3
# f is a Chebyshev series on y in [0, F_HI]: its coefficients stay O(1) (sum |c| ~ 2), whereas the
# same fit in monomials has coefficients up to ~1e3, which amplify rounding 100-1000x
F_HI = BAND[1] ** 2
TARGET = 1e-3  # total relative error the fits aim for (the bar is >= ~3e-3 on large matrices)


@dataclass(frozen=True)
class Schedule:
    """Everything ``tracked_ns_power`` needs for one (power, ell); built on the host in float64.

    steps: J, the number of X-updates. g_first / g_rest: coefficients of g(y) = sum c_j y^j for
    the first step (y in [0, 1]) and the others (y in [0, 1.44]). f: Chebyshev coefficients of
    the final multiplier on y in [0, F_HI]. bound: max |F(s)/s^p - 1| over s in [ell, 1].
    tail: max |F(s)| / ell^p over s in [0, ell / cut_factor(ell)] (how much of a cut direction
    leaks through).
    """

    power: float
    ell: float
    steps: int
    g_first: tuple[float, ...]
    g_rest: tuple[float, ...]
    f: tuple[float, ...]
    bound: float
    tail: float


def cut_factor(ell: float) -> float:
    """Directions below ``ell / cut_factor(ell)`` are zeroed by ``f`` (see COARSE_ELL)."""
    return 8.0 if ell >= COARSE_ELL else 64.0


# Under the default rounding-noise cutoff (a Cutoff with fro > 0, see .cutoff) the cut
# tau = fro ||M||_F depends on the matrix, the schedule (ell) may not (it is built on the host).
# So the normaliser becomes max(c, NOISE_LIFT tau / ell): every direction above
# max(NOISE_LIFT tau, ell c) is lifted (kept to the schedule's bound), every one below
# max(NOISE_LIFT tau, ell c) / NOISE_CUT >= tau / 2 is zeroed (rounding noise measured
# <= 0.37 tau), and the band in between is attenuated smoothly (tracked_ns's cutoff is soft).
NOISE_LIFT = 4.0
NOISE_CUT = 8.0


def noise_ell(fro: float) -> float:
    """Normalised lift threshold (relative to ||M||_F) for a noise cutoff ``fro``; 2 digits,
    rounded down so that no direction above the rule is left unlifted, in [MIN_ELL, 0.1]."""
    ell = min(max(MIN_ELL, NOISE_LIFT * fro), 0.1)
    digits = 10 ** math.floor(math.log10(ell) - 1)
    return float(f"{math.floor(ell / digits) * digits:.2g}")


def _poly(coeffs: tuple[float, ...] | torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(y)
    for cj in reversed(list(coeffs)):
        out = out * y + cj
    return out


def _h(y: torch.Tensor) -> torch.Tensor:
    return _poly(STEP, y)


def _cheb(lo: float, hi: float, count: int) -> torch.Tensor:
    t = torch.cos(torch.linspace(0.0, math.pi, count, dtype=torch.float64))
    return lo + (hi - lo) * (t + 1.0) / 2.0


def poly_basis(ys: torch.Tensor, degree: int, cheb_hi: float | None) -> torch.Tensor:
    """Monomials y^j, or Chebyshev T_j((2y - hi)/hi) on [0, hi] when ``cheb_hi`` is given."""
    if cheb_hi is None:
        return torch.stack([ys**j for j in range(degree + 1)], dim=1)
    z = (2.0 * ys - cheb_hi) / cheb_hi
    cols = [torch.ones_like(z), z]
    while len(cols) < degree + 1:
        cols.append(2.0 * z * cols[-1] - cols[-2])
    return torch.stack(cols[: degree + 1], dim=1)


def lawson_fit(basis: torch.Tensor, rhs: torch.Tensor, iters: int = 60,
               ridge: float = 0.0) -> tuple[torch.Tensor, float]:
    """Near-minimax fit ``basis @ coef ~ rhs`` (Lawson's reweighted least squares), float64.

    basis: (k, d), rhs: (k,). Returns (coef (d,), max |basis @ coef - rhs|) of the best iterate.
    ``ridge > 0`` solves each weighted least-squares problem with a Tikhonov term ``ridge
    ||coef||^2`` (the weights sum to 1): for near-collinear columns, where a plain ``lstsq``
    returns large coefficients that differ from run to run. Host-side schedule building only (it
    reads values), never inside a step."""
    lw = torch.full_like(rhs, 1.0 / rhs.numel())
    # gelsd (SVD) on the CPU: the default there, gelsy, returned a different last bit on every
    # call of the same problem, so plans differed between processes (gelsd's coefficients agree
    # with gelsy's to 1e-12); CUDA has only gels
    driver = "gelsd" if basis.device.type == "cpu" else None
    ridge_term = ridge * torch.eye(basis.size(1), dtype=basis.dtype) if ridge > 0.0 else None
    best: tuple[torch.Tensor, float] | None = None
    for _ in range(iters):
        if ridge_term is not None:
            weighted = basis * lw[:, None]
            coef = torch.linalg.solve(basis.T @ weighted + ridge_term, weighted.T @ rhs)
        else:
            sw = lw.sqrt()
            coef = torch.linalg.lstsq(basis * sw[:, None], (rhs * sw)[:, None], driver=driver).solution[:, 0]
        err = (basis @ coef - rhs).abs()
        if best is None or err.max().item() < best[1]:
            best = (coef, err.max().item())
        lw = lw * err
        lw = lw / lw.sum().clamp_min(1e-300)
    assert best is not None
    return best


def _fit(
    ys: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, degree: int, cheb_hi: float | None = None
) -> tuple[torch.Tensor, float]:
    """Near-minimax weighted polynomial fit, float64.

    Returns (coefficients low->high in the basis of :func:`poly_basis`, max weighted error over ys)."""
    return lawson_fit(poly_basis(ys, degree, cheb_hi) * weight[:, None], target * weight)


def _fit_g(power: float, hi: float, steps: int) -> tuple[float, ...]:
    """g(y) ~ h(y)^(-p) on [0, hi] in relative error: the lowest degree (2-4) whose per-step
    error times ``steps`` is within 3 TARGET (the bound itself is checked in schedule())."""
    ys = _cheb(0.0, hi, 400)
    target = _h(ys) ** (-power)
    for degree in (2, 3, 4):
        coef, err = _fit(ys, target, 1.0 / target, degree)
        if err * steps <= 3 * TARGET:  # per-step errors are not all at their maximum at once
            break
    return tuple(coef.tolist())


def _trajectory(s0: torch.Tensor, steps: int) -> list[torch.Tensor]:
    out = [s0]
    for _ in range(steps):
        s = out[-1]
        out.append(s * _h(s * s))
    return out


def _evaluate(sched_parts: tuple, power: float, steps: int, s0: torch.Tensor) -> torch.Tensor:
    """F(s0): the scalar function the matrix iteration applies to normalised singular values."""
    g_first, g_rest, f = sched_parts
    traj = _trajectory(s0, steps)
    acc = torch.ones_like(s0)
    for k in range(steps):
        acc = acc * _poly(g_first if k == 0 else g_rest, traj[k] ** 2)
    sj = traj[steps]
    return sj * (poly_basis(sj * sj, len(f) - 1, F_HI) @ torch.tensor(f, dtype=sj.dtype)) * acc


@lru_cache(maxsize=64)
def schedule(power: float, ell: float, cut: float | None = None) -> Schedule:
    """The iteration for ``power`` that lifts every normalised singular value >= ``ell``.

    Directions below ``ell / cut`` are zeroed (default ``cut_factor(ell)``).
    Host-side float64 work (a few ms), cached per (power, ell, cut)."""
    cut_f = cut_factor(ell) if cut is None else float(cut)
    if not (0.0 <= power <= 1.0):
        raise ValueError(f"power must be in [0, 1], got {power}")
    if not (0.0 < ell < BAND[0]):
        raise ValueError(f"ell must be in (0, {BAND[0]}), got {ell}")
    # J: fewest steps after which every s0 in [ell, 1] (a dense log grid) sits in the band
    grid = torch.logspace(math.log10(ell), 0.0, 4000, dtype=torch.float64)
    steps, traj = 0, grid
    while traj.min().item() < BAND[0] or traj.max().item() > BAND[1] + 1e-9:
        traj = traj * _h(traj * traj)
        steps += 1
        if steps > 60:
            raise RuntimeError("tracked_ns: the lift does not converge (bad STEP constants)")
    g_first = _fit_g(power, 1.0, steps)
    g_rest = _fit_g(power, BAND[1] ** 2, steps)
    # f ~ y^((p-1)/2) on the band in relative error, and ~0 where the directions below
    # ell / cut_factor end up: that is the rank cutoff (rounding noise would otherwise come back
    # as sigma^p, 0.13 in float32 and 0.5 in bf16). Higher degrees cost one (n, n) matmul each,
    # once per call.
    band = _cheb(BAND[0] ** 2, BAND[1] ** 2, 300)
    target = band ** ((power - 1.0) / 2.0)
    weight = 1.0 / target
    sj_cut = _trajectory(torch.tensor([ell / cut_f], dtype=torch.float64), steps)[-1].item()
    cut = torch.linspace(0.0, sj_cut**2, 80, dtype=torch.float64)
    ys = torch.cat([band, cut])
    target = torch.cat([target, torch.zeros_like(cut)])
    weight = torch.cat([weight, cut.sqrt() / ell**power + 1e-3])
    for degree in range(3, 11):
        coef, err = _fit(ys, target, weight, degree, cheb_hi=F_HI)
        if err <= TARGET / 2:
            break
    f = tuple(coef.tolist())
    fs = _evaluate((g_first, g_rest, f), power, steps, grid)
    bound = (fs / grid**power - 1.0).abs().max().item()
    low = torch.linspace(0.0, ell / cut_f, 400, dtype=torch.float64)
    tail = (_evaluate((g_first, g_rest, f), power, steps, low).abs().max() / ell**power).item()
    return Schedule(power, ell, steps, g_first, g_rest, f, bound, tail)


def effective_ell(rtol: float, n: int) -> float:
    """Smallest normalised singular value the iteration must lift for cutoff ``rtol``.

    ``s0 = sigma / c`` with ``sigma_max <= c <= n^{1/8} sigma_max``, so a kept
    ``sigma > rtol sigma_max`` has ``s0 > rtol / n^{1/8}``. Rounded to 2 significant digits so
    that the schedule cache stays small. Capped at 0.1: a cutoff ``rtol`` above about
    ``0.1 n^{1/8}`` is then applied softly (directions down to 0.1 c are kept).
    """
    ell = max(MIN_ELL, rtol / n ** 0.125)
    ell = min(ell, 0.1)
    return float(f"{ell:.2g}")


Matmul = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _matrix_poly(coeffs: tuple[float, ...], powers: list[torch.Tensor], eye: torch.Tensor) -> torch.Tensor:
    """sum_j c_j G^j from ``powers = [G, G^2, ...]``."""
    out = coeffs[0] * eye
    for cj, pw in zip(coeffs[1:], powers):
        out = out + cj * pw
    return out


def _matrix_chebyshev(coeffs: tuple[float, ...], gram: torch.Tensor, eye: torch.Tensor, mm: Matmul) -> torch.Tensor:
    """sum_j c_j T_j(Z), Z = (2G - F_HI I) / F_HI, by the three-term recurrence (|T_j(Z)| <= 1)."""
    z = (2.0 / F_HI) * gram - eye
    t_prev, t_cur = eye, z
    out = coeffs[0] * eye + coeffs[1] * z
    for cj in coeffs[2:]:
        t_prev, t_cur = t_cur, 2.0 * mm(z, t_cur) - t_prev
        out = out + cj * t_cur
    return out


def tracked_ns_power(x: torch.Tensor, power: float, rtol: float, mm: Matmul = torch.matmul) -> torch.Tensor:
    """``U Σ^p V^T`` by the tracked Newton–Schulz iteration. (b, m, n), m >= n -> (b, m, n) float32.

    Every rank that owns a matrix runs this on its batch; only matmuls, elementwise ops and
    norms, no data-dependent branches and no ``.item()``. ``mm`` computes every product (a
    benchmark passes one that rounds operands, to measure lower-precision matmuls on a CPU).
    """
    if power == 1.0:
        return x.to(torch.float32)
    xf = x.to(torch.float32)
    n = xf.size(-1)
    noise_rule = getattr(rtol, "fro", 0.0) > 0.0
    if noise_rule:
        sched = schedule(float(power), noise_ell(rtol.fro), NOISE_CUT)
    else:
        sched = schedule(float(power), effective_ell(float(rtol), n))
    # scale by the max-abs entry first so that G and G^2 neither overflow nor underflow
    amax = xf.abs().amax(dim=(-2, -1), keepdim=True)
    amax = torch.where(amax > 0, amax, torch.ones_like(amax))
    xf = xf / amax
    eye = torch.eye(n, dtype=torch.float32, device=xf.device)
    gram = mm(xf.mT, xf)
    gram2 = mm(gram, gram)
    c2 = torch.linalg.matrix_norm(gram2).sqrt()[..., None, None]  # >= sigma_max^2
    if noise_rule:
        # normaliser N = max(c, NOISE_LIFT tau / ell), tau = fro ||M||_F: where the lift reaches
        # below NOISE_LIFT tau from c, c stays (the former behaviour, cut at ell c / 8 > noise);
        # otherwise N puts NOISE_LIFT tau exactly at ell. N >= c >= sigma_max either way.
        lift = NOISE_LIFT * rtol.fro / sched.ell
        c2 = torch.maximum(c2, (lift * lift) * xf.square().sum(dim=(-2, -1), keepdim=True))
    c2 = torch.where(c2 > 0, c2, torch.ones_like(c2))
    xk = xf / c2.sqrt()
    powers = [gram / c2, gram2 / (c2 * c2)]
    acc = None
    for k in range(sched.steps):
        if k > 0:
            gram = mm(xk.mT, xk)
            powers = [gram, mm(gram, gram)]
        g = sched.g_first if k == 0 else sched.g_rest
        while len(powers) < len(g) - 1:
            powers.append(mm(powers[-1], powers[0]))
        gk = _matrix_poly(g, powers, eye)
        acc = gk if acc is None else mm(acc, gk)
        xk = mm(xk, _matrix_poly(STEP, powers[:2], eye))
    final = _matrix_chebyshev(sched.f, mm(xk.mT, xk), eye, mm)
    out = mm(xk, final if acc is None else mm(acc, final))
    return out * (c2.sqrt() * amax) ** power


def tracked_ns_cost(m: int, n: int) -> float:
    # per step: G = X^T X and X H (2mn^2 each), G^2 and acc @ g (2n^3 each); J = 12 at p = 1/8
    steps = schedule(0.125, MIN_ELL).steps
    return (steps + 1) * (4.0 * m * n * n + 4.0 * n**3)


register_method(
    SpectralMethod(
        name="tracked_ns",
        fn=tracked_ns_power,
        cost=tracked_ns_cost,
        exact=False,
        powers="any",
        description=(
            "approximate, matmul-only: Newton-Schulz lift tracking prod h^(-p); float32; "
            "proven bound schedule(p, ell).bound (~1e-3)"
        ),
    )
)
