"""``"fast_ns"``: HTMuon's ``U Σ^p V^T`` from fp16/bf16 matrix products (float32 accumulation).

The identity of :mod:`.tracked_ns`: an iteration ``X_{k+1} = X_k h_k(X_k^T X_k)`` multiplies
every singular value by ``h_k(s_k^2)``, so ``s_0^p = s_J^p prod_k h_k(s_k^2)^(-p)`` and

    T = X_J f(G_J) prod_k g_k(G_k),   G_k = X_k^T X_k,   g_k ~ h_k^(-p),
    f(y) ~ y^((p-1)/2) on the final band and ~0 below the cut (a Chebyshev series).

A :class:`Plan` holds the scalar polynomials (built on the host in float64); :func:`run_plan`
applies one to a batch. What ``fast_ns`` changes against ``tracked_ns`` (same plan family):

* **precision** (every product through :func:`.precision.mm`): the first step's matrix-sized
  operand is the input scaled by a power of two, exact when the input is bf16 or fp16 (those
  products run in the input's own dtype); every later operand is rounded to ``dtype`` (default
  float16, 8x finer than bf16 at the same tensor-core rate). Rounding ``h_k(G_k)``, ``g_k`` or
  the accumulator multiplies ``X`` from the right: it keeps the rank and is relative per
  direction. Only rounding ``X_k`` itself adds isotropic noise; in fp16 that noise sits ~8x
  under the bf16 cutoff, so the lift never gives it weight (in bf16 it does: see
  docs/spectral.md, "fast_ns").
* **floor** ``ell`` of the lift from the noise cutoff (``tracked_ns.noise_ell``: ~1e-3 of
  ``||M||_F`` for bf16 data instead of 1e-5): 6-8 steps instead of 12.

Cut: normaliser ``N = max(c, NOISE_LIFT tau / ell)`` (``c = ||G_0^2||_F^{1/4} >= sigma_max``,
``tau = fro ||M||_F`` the default noise cutoff): every direction above
``max(NOISE_LIFT tau, ell c)`` is lifted, every one below ``1/NOISE_CUT`` of that is zeroed, the
band between is attenuated smoothly (a soft version of the exact method's hard cut at ``tau``).
An explicit float ``rtol`` lifts from ``effective_ell(rtol, n)`` as tracked_ns does.

Also here: :func:`minimax_plan`, per-step minimax quintics (the Polar Express idea, arXiv
2505.16932, re-derived) with fitted ``g_k``. It lifts from 1e-2 in 4 steps, but its ``h_k``
range over a factor 8-25 per step and no quadratic ``g_k`` follows ``h_k^(-p)`` to better than
~2-20 % (measured in ``benchmarks/fast_ns_frontier.py``); it is a frontier candidate only.

Batched over (b, m, n), m >= n; matmuls, elementwise ops and norms only: no decomposition, no
``.item()``, no data-dependent Python branch (CUDA streams and graphs stay safe; runs on
``meta``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch

from . import chebyshev, precision
from .cutoff import noise_cutoff, operand_cutoff
from . import tracked_ns as _tn
from .registry import SpectralMethod, register_method

DEFAULT_DTYPE = torch.float16
# For an explicit (non-noise) rtol the lift floor is never below this: fast_ns is for 16-bit
# data, whose noise sits far above 1e-4 of sigma_max (tracked_ns covers smaller cutoffs).
MIN_ELL = 1e-4
# Noise rule: lift every direction above NOISE_LIFT tau, zero every one below NOISE_LIFT tau /
# NOISE_CUT (rounding noise measured <= 0.37 tau, .cutoff). tracked_ns uses 4 and 8; a narrower
# soft band keeps real directions just above tau (measured: docs/spectral.md, "fast_ns").
NOISE_LIFT = 4.0
NOISE_CUT = 8.0
# Accuracy the final multiplier f is fitted to. 1e-2 (degree ~7) would save 2-4 (n, n) products
# (~4 % of the priced cost) but measured err/gap 0.245 at (1365, 512), p = 1/16, heavy-tailed:
# at the 0.25 target; 1e-3 (degree 9-11) measured 0.085 there (benchmarks/fast_ns_frontier.py).
F_TARGET = 1e-3


@dataclass(frozen=True)
class Plan:
    """The scalar side of one fast_ns run, float64 on the host.

    quintics: ``(a, b, c)`` of ``h_k(y) = a + b y + c y^2`` per step (J steps). g: monomial
    coefficients of ``g_k(y) ~ h_k(y)^(-p)`` per step (degree 2 or 3). f: Chebyshev
    coefficients of the final multiplier on ``[0, f_hi]``. bound: ``max |F(s)/s^p - 1|`` over
    ``s in [ell, 1]`` in exact arithmetic (F = what the plan applies to a normalised value).
    """

    power: float
    ell: float
    cut: float
    quintics: tuple[tuple[float, float, float], ...]
    g: tuple[tuple[float, ...], ...]
    f: tuple[float, ...]
    f_hi: float
    bound: float

    @property
    def steps(self) -> int:
        return len(self.quintics)


@lru_cache(maxsize=128)
def tracked_plan(power: float, ell: float, cut: float = _tn.NOISE_CUT) -> Plan:
    """tracked_ns's schedule for (power, ell) as a Plan: its fixed step, g and f fits."""
    sch = _tn.schedule(float(power), float(ell), float(cut))
    g = (sch.g_first,) + (sch.g_rest,) * (sch.steps - 1)
    return Plan(float(power), float(ell), float(cut), (_tn.STEP,) * sch.steps, g, sch.f, _tn.F_HI, sch.bound)


def _two_digits_down(v: float) -> float:
    digits = 10 ** math.floor(math.log10(v) - 1)
    return float(f"{math.floor(v / digits) * digits:.2g}")


def _attractor(q: tuple[float, float, float]) -> tuple[float, float]:
    """The band that ``s h(s^2)`` keeps every lifted value in (iterated to its limit)."""
    t = torch.linspace(0.02, 1.0, 4000, dtype=torch.float64)
    for _ in range(200):
        t = t * step_h(q, t * t)
    return t.min().item(), t.max().item()


@lru_cache(maxsize=128)
def fixed_plan(
    power: float, ell: float, cut: float, step: tuple[float, float, float] = _tn.STEP, target: float = 1e-3
) -> Plan:
    """One step polynomial repeated (as tracked_ns), its g fitted per step and f to ``target``.

    A faster ``step`` needs fewer steps, a looser ``target`` a lower-degree f; both trade
    accuracy for cost (benchmarks/fast_ns_frontier.py)."""
    lo_band, hi_band = _attractor(step)
    lo_band, hi_band = lo_band * 0.995, hi_band * 1.005
    grid = torch.logspace(math.log10(ell), 0.0, 4000, dtype=torch.float64)
    traj, steps, ups = grid, 0, [1.0]
    while traj.min().item() < lo_band or traj.max().item() > hi_band:
        traj = traj * step_h(step, traj * traj)
        steps += 1
        if steps > 40:
            raise RuntimeError(f"fast_ns: step {step} does not lift [{ell}, 1] into its band")
    top = torch.linspace(0.0, 1.0, 2000, dtype=torch.float64)
    for _ in range(steps - 1):
        top = top * step_h(step, top * top)
        ups.append(max(ups[-1], top.max().item()))
    g = tuple(_fit_g(step, power, u) for u in ups)
    f_hi = hi_band * hi_band
    band = torch.linspace(lo_band**2, hi_band**2, 300, dtype=torch.float64)
    s_cut = torch.tensor([ell / cut], dtype=torch.float64)
    for _ in range(steps):
        s_cut = s_cut * step_h(step, s_cut * s_cut)
    low = torch.linspace(0.0, s_cut.item() ** 2, 120, dtype=torch.float64)
    ys = torch.cat([band, low])
    want = torch.cat([band ** ((power - 1.0) / 2.0), torch.zeros_like(low)])
    weight = torch.cat([band ** ((1.0 - power) / 2.0), low.sqrt() / ell**power + 1e-3])
    for degree in range(2, 12):
        coef, err = _lawson(_tn.poly_basis(ys, degree, f_hi) * weight[:, None], want * weight, 60)
        if err <= target / 2:
            break
    f = tuple(coef.tolist())
    fs = _evaluate((step,) * steps, g, f, f_hi, power, grid)
    bound = (fs / grid**power - 1.0).abs().max().item()
    return Plan(float(power), float(ell), float(cut), (step,) * steps, g, f, f_hi, bound)


def plan_for(power: float, rtol: float, n: int, lift: float = NOISE_LIFT, cut: float = NOISE_CUT) -> Plan:
    """The plan fast_ns runs for ``power`` and cutoff ``rtol`` (a Cutoff or float) at width n:
    under the noise rule it lifts from ``lift * fro`` (normalised by ||M||_F) and zeroes below
    ``1 / cut`` of that."""
    fro = getattr(rtol, "fro", 0.0)
    if fro > 0.0:
        ell = _two_digits_down(min(max(MIN_ELL, lift * fro), 0.1))
        return fixed_plan(float(power), ell, float(cut), _tn.STEP, F_TARGET)
    ell = max(MIN_ELL, _tn.effective_ell(float(rtol), n))
    return fixed_plan(float(power), ell, _tn.cut_factor(ell), _tn.STEP, F_TARGET)


def _matrix_poly(coeffs: tuple[float, ...], powers: list[torch.Tensor], eye: torch.Tensor) -> torch.Tensor:
    out = coeffs[0] * eye
    for cj, pw in zip(coeffs[1:], powers):
        out = out + cj * pw
    return out


def run_plan(
    x: torch.Tensor, plan: Plan, rtol_fro: float = 0.0, dtype: torch.dtype = DEFAULT_DTYPE, lift: float = NOISE_LIFT
) -> torch.Tensor:
    """Applies ``plan`` to x (b, m, n), m >= n -> (b, m, n) float32; see the module docstring.

    ``rtol_fro > 0``: the noise rule's Frobenius part (the normaliser is raised so that
    ``lift * rtol_fro * ||M||_F`` sits at ``plan.ell``). ``dtype``: operand dtype of every
    product after the first step's (bf16, fp16 or float32).
    """
    if dtype not in precision.SUPPORTED:
        raise ValueError(f"fast_ns: dtype must be torch.float16, torch.bfloat16 or torch.float32, got {dtype}")
    # step 0 multiplies the input itself: in its own 16-bit dtype it is exact
    first = x.dtype if x.dtype in precision.LOW_PRECISION else dtype
    n = x.size(-1)
    eye = torch.eye(n, dtype=torch.float32, device=x.device)
    amax = x.abs().amax(dim=(-2, -1), keepdim=True).to(torch.float32)
    amax = torch.where(amax > 0, amax, torch.ones_like(amax))
    two = torch.exp2(torch.ceil(torch.log2(amax)))  # a power of two: x0 is x, exactly, rescaled
    x0 = x.to(torch.float32) / two  # the only float32 copy of the input
    gram = precision.mm(x0.mT, x0, first)
    fro2 = torch.linalg.matrix_norm(gram)[..., None, None]  # ||G||_F >= sigma_max^2
    fro2 = torch.where(fro2 > 0, fro2, torch.ones_like(fro2))
    gram = gram / fro2  # entries <= 1: safe operands in fp16
    gram2 = precision.mm(gram, gram, dtype)
    c2 = torch.linalg.matrix_norm(gram2).sqrt()[..., None, None]  # sigma_max^2 / ||G||_F <= c2
    if rtol_fro > 0.0:
        rel = lift * rtol_fro / plan.ell
        c2 = torch.maximum(c2, (rel * rel) * x0.square().sum(dim=(-2, -1), keepdim=True) / fro2)
    c2 = torch.where(c2 > 0, c2, torch.ones_like(c2))
    inv_norm = torch.rsqrt(c2 * fro2)  # 1 / N in x0's units; folded into step 0's right factor
    powers = [gram / c2, gram2 / (c2 * c2)]
    xk, acc = x0, None
    del x0  # memory: only X_k (float32) and one product's operands and output are alive
    for k, (q, g) in enumerate(zip(plan.quintics, plan.g)):
        if k > 0:
            gk = precision.mm(xk.mT, xk, dtype)
            powers = [gk, precision.mm(gk, gk, dtype)]
        while len(powers) < len(g) - 1:
            powers.append(precision.mm(powers[-1], powers[0], dtype))
        corr = _matrix_poly(g, powers, eye)
        acc = corr if acc is None else precision.mm(acc, corr, dtype)
        step = _matrix_poly(q, powers[:2], eye)
        if k == 0:
            xk = precision.mm(xk, step * inv_norm, first)
        else:
            xk = precision.mm(xk, step, dtype)
    final = _matrix_chebyshev(plan.f, plan.f_hi, precision.mm(xk.mT, xk, dtype), eye, dtype)
    weight = final if acc is None else precision.mm(acc, final, dtype)
    out = precision.mm(xk, weight, dtype)
    del xk
    return out.mul_((two * inv_norm.reciprocal()) ** plan.power)


def _matrix_chebyshev(coeffs, hi: float, gram: torch.Tensor, eye: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """sum_j c_j T_j(Z), Z = (2G - hi I) / hi, by Paterson–Stockmeyer blocks in the Chebyshev
    basis (:mod:`.chebyshev`: 5 products at degree 9-11 instead of the recurrence's 8-10; every
    operand's spectrum stays within the sums of coefficients, so 16-bit operands stay in range)."""
    z = (2.0 / hi) * gram - eye
    return chebyshev.matrix_series(coeffs, z, eye, lambda a, b: precision.mm(a, b, dtype))


def fast_ns_power(x: torch.Tensor, power: float, rtol: float, dtype: torch.dtype = DEFAULT_DTYPE) -> torch.Tensor:
    """``U Σ^p V^T`` of each matrix of x (b, m, n), m >= n -> (b, m, n) float32.

    rtol: the resolved cutoff (a :class:`.cutoff.Cutoff` from ``default_rtol``, or a float).
    dtype: operand dtype of the products after step 0 (float16 default; bfloat16 measured
    worse, float32 is tracked_ns in all but the first step). Every owner runs this on its batch.
    """
    if power == 1.0:
        return x.to(torch.float32)
    if not 0.0 <= power < 1.0:
        raise ValueError(f"fast_ns: power must be in [0, 1], got {power}")
    rtol = operand_cutoff(rtol, x, dtype)
    plan = plan_for(float(power), rtol, x.size(-1))
    return run_plan(x, plan, rtol.fro, dtype)


def plan_products(plan: Plan) -> dict[str, int]:
    """How many products of each kind one matrix costs: ``"mn2"`` (m x n by n x n, or the Gram
    X^T X: 2 m n^2 FLOPs each) and ``"n3"`` (n x n by n x n: 2 n^3 each)."""
    mn2 = 2 * plan.steps + 2  # G_k and X_k H_k per step; G_J and the final X_J W
    n3 = 0
    for k, g in enumerate(plan.g):
        n3 += max(1, len(g) - 2)  # G_k^2 and any higher power g needs
        n3 += 1 if k > 0 else 0  # acc @ g_k
    n3 += chebyshev.products(len(plan.f) - 1) + 1  # f's Paterson-Stockmeyer blocks, acc @ f
    return {"mn2": mn2, "n3": n3}


# the cost is for p = 1/8 with bf16 data's noise cutoff at this shape (what the planner meets)
def fast_ns_cost(m: int, n: int) -> float:
    """FLOPs of one (m, n) matrix, m >= n, all in 16-bit operands (priced like ns5's bf16)."""
    counts = plan_products(plan_for(0.125, noise_cutoff((m, n), torch.finfo(torch.bfloat16).eps), n))
    return 2.0 * m * n * n * counts["mn2"] + 2.0 * n**3 * counts["n3"]


def fast_ns_workspace(m: int, n: int) -> float:
    """Bytes beyond input and output: float32 X_k and its next value (2 x 4mn), one operand's
    16-bit copy and, on the CPU emulation, its float32 widening (2mn + 4mn), plus ~12 float32
    (n, n) matrices (G, its powers, acc, the Chebyshev terms and their operand copies)."""
    return 14.0 * m * n + 48.0 * n * n + 4.0 * m * n  # + 4mn margin: the input's float32 copy


# -- the minimax candidate (frontier only) ----------------------------------------------------

CUT = 8.0  # zero every direction below ell / CUT
MAX_ELL = 0.1
TARGET = 3e-3  # what the f fit aims for
H_MIN = 0.3  # each step's h stays >= H_MIN (relative to the band's top): see _step_quintic


def _lawson(basis: torch.Tensor, rhs: torch.Tensor, iters: int = 80) -> tuple[torch.Tensor, float]:
    """tracked_ns's Lawson fit, with this module's default of 80 reweightings."""
    return _tn.lawson_fit(basis, rhs, iters)


def _grid(lo: float, hi: float, count: int = 600) -> torch.Tensor:
    """Log- and linearly-spaced points of [lo, hi] (both ends of a wide interval matter)."""
    a = torch.logspace(math.log10(lo), math.log10(hi), count, dtype=torch.float64)
    b = torch.linspace(lo, hi, count, dtype=torch.float64)
    return torch.cat([a, b]).sort().values


def _minimax_quintic(lo: float, hi: float) -> tuple[float, float, float]:
    """(a, b, c) of the odd quintic ``s (a + b s^2 + c s^4)`` closest to 1 on [lo, hi]."""
    s = _grid(lo / hi, 1.0)
    coef, _ = _lawson(torch.stack([s, s**3, s**5], dim=1), torch.ones_like(s))
    a, b, c = coef.tolist()
    return (a / hi, b / hi**3, c / hi**5)  # the same map, rescaled to [lo, hi]


def step_h(q: tuple[float, float, float], y: torch.Tensor) -> torch.Tensor:
    """h(y) = a + b y + c y^2 of a step quintic q = (a, b, c): s -> s h(s^2)."""
    return q[0] + q[1] * y + q[2] * y * y


def _h_min(q: tuple[float, float, float], hi: float) -> float:
    y = torch.linspace(0.0, hi * hi, 400, dtype=torch.float64)
    return step_h(q, y).min().item()


def _step_quintic(lo: float, hi: float, h_min: float) -> tuple[float, float, float]:
    """The minimax quintic on [lo', hi] for the smallest lo' >= lo whose h stays >= h_min * (its
    value at hi) on [0, hi^2]: a deep dip of h would make h^(-p) unfittable by a quadratic."""
    q = _minimax_quintic(lo, hi)
    if _h_min(q, hi) >= h_min / hi:
        return q
    a, b = math.log(lo), math.log(hi * 0.999)  # bisection on log lo'
    for _ in range(40):
        mid = 0.5 * (a + b)
        if _h_min(_minimax_quintic(math.exp(mid), hi), hi) >= h_min / hi:
            b = mid
        else:
            a = mid
    return _minimax_quintic(math.exp(b), hi)


def _quintics(
    ell: float, steps: int, h_min: float = 0.0
) -> tuple[tuple[tuple[float, float, float], ...], float, float]:
    """The per-step quintics from [ell, 1] and the final band (lo, hi) of the lifted values."""
    lo, hi, out = ell, 1.0, []
    for _ in range(steps):
        q = _step_quintic(lo, hi, h_min)
        s = _grid(lo, hi)
        ps = s * step_h(q, s * s)
        out.append(q)
        lo, hi = ps.min().item(), ps.max().item()
    return tuple(out), lo, hi


def _fit_g(q: tuple[float, float, float], power: float, hi: float) -> tuple[float, float, float]:
    """g(y) = g0 + g1 y + g2 y^2 ~ h(y)^(-p) on [0, hi^2] in relative error."""
    y = torch.linspace(0.0, hi * hi, 800, dtype=torch.float64)
    target = step_h(q, y) ** (-power)
    basis = torch.stack([torch.ones_like(y), y, y * y], dim=1) / target[:, None]
    coef, _ = _lawson(basis, torch.ones_like(y))
    return tuple(coef.tolist())


def _evaluate(quintics, g, f, f_hi, power, s0: torch.Tensor) -> torch.Tensor:
    """F(s0): what the matrix iteration applies to a normalised singular value s0 (float64)."""
    s, acc = s0, torch.ones_like(s0)
    for q, gk in zip(quintics, g):
        y = s * s
        acc = acc * (gk[0] + gk[1] * y + gk[2] * y * y)
        s = s * step_h(q, y)
    return s * (_tn.poly_basis(s * s, len(f) - 1, f_hi) @ torch.tensor(f, dtype=s.dtype)) * acc


@lru_cache(maxsize=128)
def minimax_plan(power: float, ell: float, steps: Optional[int] = None, h_min: float = H_MIN) -> Plan:
    """The plan that lifts every normalised singular value in [ell, 1] and cuts below ell/CUT.

    ``steps=None``: the fewest steps (2-8) whose band is within 1 +- 0.05 (f then has a low
    degree). Host-side float64, a few tens of ms, cached.
    """
    if not 0.0 < power < 1.0:
        raise ValueError(f"fast_ns: power must be in (0, 1) here, got {power}")
    if not 0.0 < ell <= MAX_ELL:
        raise ValueError(f"fast_ns: ell must be in (0, {MAX_ELL}], got {ell}")
    if steps is None:
        for steps in range(2, 9):
            _, lo, hi = _quintics(ell, steps, h_min)
            if lo >= 0.95 and hi <= 1.05:
                break
    quintics, lo, hi = _quintics(ell, steps, h_min)
    ups = [1.0]
    for q in quintics[:-1]:
        s = _grid(1e-9, ups[-1])
        ups.append(max(ups[-1], (s * step_h(q, s * s)).max().item()))
    g = tuple(_fit_g(q, power, u) for q, u in zip(quintics, ups))
    # f ~ y^((p-1)/2) on the band, ~0 where directions below ell / CUT end up (the cut)
    f_hi = hi * hi * 1.001
    band = torch.linspace(lo * lo, hi * hi, 300, dtype=torch.float64)
    s_cut = torch.tensor([ell / CUT], dtype=torch.float64)
    for q in quintics:
        s_cut = s_cut * step_h(q, s_cut * s_cut)
    cut = torch.linspace(0.0, s_cut.item() ** 2, 120, dtype=torch.float64)
    ys = torch.cat([band, cut])
    target = torch.cat([band ** ((power - 1.0) / 2.0), torch.zeros_like(cut)])
    weight = torch.cat([band ** ((1.0 - power) / 2.0), cut.sqrt() / ell**power + 1e-3])
    for degree in range(2, 12):
        coef, err = _lawson(_tn.poly_basis(ys, degree, f_hi) * weight[:, None], target * weight)
        if err <= TARGET / 2:
            break
    f = tuple(coef.tolist())
    grid = torch.logspace(math.log10(ell), 0.0, 4000, dtype=torch.float64)
    fs = _evaluate(quintics, g, f, f_hi, power, grid)
    bound = (fs / grid**power - 1.0).abs().max().item()
    return Plan(float(power), float(ell), CUT, quintics, g, f, f_hi, bound)


register_method(
    SpectralMethod(
        name="fast_ns",
        fn=fast_ns_power,
        cost=fast_ns_cost,
        exact=False,
        powers="any",
        description=(
            "approximate, matmul-only in fp16/bf16 with fp32 accumulation: tracked Newton-Schulz "
            "lift from the noise floor; for 16-bit data on GPUs"
        ),
        workspace=fast_ns_workspace,
    )
)
