"""``"log_ns"``: HTMuon's ``U Σ^p V^T`` from 16-bit matrix products, tracked in the log domain.

Two phases lift every normalised singular value ``σ`` of ``X_0 = M / ||M||_F`` from the noise
cutoff towards 1, and each produces Gram matrices whose eigenvalue in the direction of ``σ`` is a
known scalar function of ``σ``:

1. **X phase** (``plan.steps``, k1 Newton–Schulz quintics): ``G_k = X_k^T X_k``, ``X_{k+1} = X_k
   h(G_k)``, ``s_{k+1} = s_k h(s_k^2)``. Each step forms a fresh Gram matrix from the lifted
   ``X_k``, so its 16-bit rounding is relative to the current spectrum: this is the phase that
   handles the smallest singular values. It stops at ``X_{k1}``: after one step on tall
   matrices, three near square (:func:`x_steps_for`).
2. **Gram phase** (``plan.gram``, k2 quadratics): ``G_{j+1} = a G_j + b G_j^2``, one (n, n)
   product per step, where an X step costs ``2 m n^2 + n^3``. A quadratic in ``y`` lifts 2.58x
   per product (a quintic X step 9x in ``y`` per three products at best), so on tall matrices
   this phase does the rest of the lift at a fraction of the cost.

The update needs, per direction, ``σ^p / s_{k1}(σ)``. Its logarithm ``ℓ(σ) = p ln σ - ln
s_{k1}(σ)`` is fitted, once per plan, in float64 on the host, as a sum of Chebyshev terms of the
Gram eigenvalues: ``T_1, T_2`` of every ``G_k`` (``G_k^2`` is computed anyway) and
``FINAL_DEGREE`` terms in the last one, ``G_K``:

    L = c_0 I + Σ_{k<K} (c_k1 T_1(Z_k) + c_k2 T_2(Z_k)) + Σ_j d_j T_j(Z_K),   Z_k = 2 G_k / ymax_k - I,
    T = X_{k1} · (E (E C(Z_K))),   E = q(L)

The sum costs no product. **Read-out.** ``q`` is the degree-4 Taylor polynomial of ``e^(x/2)``
(two products: ``L^2``, then ``L^2 (c_3 L + c_4 L^2)``), so ``E^2 ~ exp(L)``; but ``L`` is
fitted *through* ``q``, to ``x`` with ``2 ln q(x) = ln(σ^p / s_{k1}) - ln C`` (rows weighted by
the log slope of ``q^2``, so the residuals are errors of ``ln F``). The map need not be close to
``exp``, only rising and with an inverse the basis fits as well: measured, the quartic's fit is
within 3% of ``exp``'s at 2 products against ``exp``'s 4-5 (benchmarks/lift_fit.py part 6; a
linear ``E`` misses by ~10x, the direct fit of the ratio by ~30x). ``readout="exp"`` keeps
``exp(L / 2)`` by Paterson–Stockmeyer Taylor blocks with scaling and squaring, for comparison
(benchmarks/fast_ns_frontier.py's ``log_ns/exp``). The fit is joint (all Gram matrices at once),
so the steps may fold (map distinct σ onto the same later value: the earlier Gram matrices still
tell them apart).

**Normalisation and the rank cutoff.** The noise cutoff ``τ = fro ||M||_F`` (the exact methods'
rule, :mod:`.cutoff`) is at the normalised value ``fro``, a host constant, for every matrix. The
plan lifts from ``floor = NOISE_LIFT τ`` and fits every direction above it (``plan.bound``: the
largest error of ``ln(F(σ)/σ^p)`` over ``[floor, 1]`` in exact arithmetic); it zeroes every
direction below ``plan.zero = NOISE_ZERO τ`` (rounding-made directions measure <= 0.37 τ);
between the two the weight falls smoothly, a soft version of the exact method's hard cut at
``τ``. The zeroing is the cut factor ``C``, a Chebyshev series in the last Gram matrix (where the
floor sits at ``y >= FINAL_LOW`` and the zero point ~6x lower), fitted to 1 on the lifted band and
0 below ``plan.zero``; ``L`` absorbs C's deviation from 1 on the band (it is fitted to
``ln(σ^p / s_{k1}) - ln C``). ``plan.leak`` bounds what a direction below the zero point keeps.
The weight is largest on the directions under the floor (``exp(L)`` up to ~e^6 on tall
matrices), and one fp16 rounding of it as the left factor of ``exp(L) · C`` leaked that size into
the kept directions (measured 2.4-5.2x the accuracy bar on rank-deficient inputs, also with L held
flat under the zero point). So the product is ``E (E C)`` with ``E ~ exp(L / 2)``, whose roundings
are ~e^3 (measured 0.53x; a plan is rejected where ``E`` exceeds MAX_E on any direction). With
``exp``, ``E`` is exp's value before its last squaring (no extra product); ``exp`` plans without
a squaring carry ``exp(L)`` as two fp16 terms instead (:func:`.precision.mm_split`, 0.52x).
docs/spectral.md, "log_ns", has the measurements.

**Precision.** Every product goes through :func:`.precision.mm` with float32 output. The first
Gram matrix multiplies the input itself, scaled by a power of two: exact for bf16/fp16 data, so it
runs in the input's own dtype. Every later operand is rounded to fp16 (default), whose 11-bit
significand keeps ``X_k``'s rounding ~8x under the bf16 noise cutoff at bf16's tensor-core rate.
``X_k`` is carried scaled by a power of two near ``sqrt(m)`` so that its entries stay far from
fp16's subnormal range. Errors of the (n, n) side enter ``L`` additively, i.e. relatively per
direction of the output.

Batched over (b, m, n), m >= n; matmuls, elementwise ops and norms only: no decomposition, no
``.item()``, no data-dependent Python branch (CUDA streams and graphs stay safe; runs on
``meta``). Every owner runs it on its same-shape batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch

from . import chebyshev, precision
from .cutoff import noise_cutoff, operand_cutoff
from .fast_ns import step_h
from .registry import SpectralMethod, register_method
from .tracked_ns import lawson_fit, poly_basis

DEFAULT_DTYPE = torch.float16
# The X phase's step quintic h(y) = a + b y + c y^2 (s -> s h(s^2)): lift 3.0, a smoother h than
# Jordan's NS5 step; benchmarks/lift_fit.py compares both as pure-X schedules.
X_STEP = (3.0, -4.5, 1.8)
# Gram-phase quadratic y -> a y - (a^2 / 4) y^2: lift a in y, largest value 1 (at y = 2 / a), so
# it maps [0, 4 / a] into [0, 1] (values above 2 / a fold; the fit reads them off earlier Gram
# matrices). a = 2.58 instead of 2.5 saves a Gram step at some shapes (with the exp read-out:
# priced 11008 x 4096: 1.18x NS5 against 1.22x; 2048^2: 2.00x against 2.07x) and measured err/gap 0.127 / 0.056 /
# 0.026 at 5461 x 2048 (2.5: 0.129 / 0.079 / 0.037), 0.120 / 0.058 / 0.060 at 512 x 256 (2.5:
# 0.104 / 0.047 / 0.034). From a = 2.7 on, the fit misses its bound (the map folds more).
GRAM_STEP = (2.58, -1.6641)
# X steps per plan: an X step costs 2 m n^2 + n^3, the Gram steps that lift as far ~2.4 n^3. On
# tall matrices (m >= TALL n) one X step, which lifts the floor 3x before the Gram phase, is
# enough: fp16 rounding of the (n, n) side moves an eigenvalue by ~u ||G||_F / n, small against
# the floor's, and most of the lift runs at n^3 per product. Near square, X steps cost barely more
# than the Gram lift they replace and hold the floor's precision better. Measured
# (benchmarks/fast_ns_frontier.py, bf16 data, worst err/gap of the four spectra at p = 1/16):
# 1365 x 512: 0.142 (1 X step, priced 1.09x NS5), 0.157 (3 X steps, 1.31x); 1024 x 1024 power
# law: 0.156 (1 X step), 0.087 (3 X steps) at 1.87x and 1.93x.
TALL, TALL_X_STEPS, SQUARE_X_STEPS = 1.5, 1, 3
FINAL_LOW = 0.25  # the floor's eigenvalue in the last Gram matrix: the final series' range
MAX_X_STEPS, MAX_GRAM_STEPS = 8, 16
MAX_COEF, MAX_SQUARINGS = 4.0, 4  # :func:`_well_posed` (accepted fits measured 0.4-2.3 and 2-4)
# The rank cutoff (module docstring): lift from NOISE_LIFT tau, zero below NOISE_ZERO tau
# (rounding-made directions measure <= 0.37 tau). Lifting from 2 tau (two Gram steps fewer)
# attenuated real directions just above tau: bf16 power law at 5461 x 2048, whose smallest
# singular values lie at 1.4 tau, measured err/gap 0.84 at p = 1/16 (1.25 tau: 0.13); a power law
# down to 1.1 tau at 1365 x 512 measured 2.7 (1.25 tau: 0.14). A narrower band makes C steeper
# and the fit of L harder.
NOISE_LIFT, NOISE_ZERO = 1.25, 0.45
# C's Chebyshev degrees and the weights of L's rows between the zero point and the floor (L held
# near its natural continuation there so that exp(L) does not blow up under the floor), tried in
# this order; the first plan within the bound, well posed and with leak <= MAX_LEAK is taken.
CUT_DEGREES = (6, 5, 7)
MID_WEIGHTS = (1e-3, 3e-3, 1e-2)
CUT_LOW_WEIGHT, CUT_RAMP_WEIGHT = 30.0, 0.1  # C's fit: rows below the zero point, rows between
MIN_CUT = 0.8  # C on the lifted band stays >= this (L absorbs ln C; a small C would be a cut there)
MAX_LEAK = 0.01  # F(sigma) / floor^p below the zero point, exact arithmetic
FINAL_DEGREE = 6  # Chebyshev terms in the last Gram matrix (T_1, T_2 free; the rest 2 products, .chebyshev)
# A plan is accepted when its fitted log error is at most FIT_TARGET * p over [floor, 1]. The
# accuracy bar's gap is at least ~0.35 p on the test spectra (docs/spectral.md), so this keeps
# the fit alone under a tenth of the 0.25 x gap target, leaving the rest for rounding.
FIT_TARGET = 0.035
# The fit's columns are near-collinear once several Gram steps have saturated; a Tikhonov term
# keeps the coefficients ~0.5 and the plan the same in every process (plain lstsq: up to 1e3,
# varying between runs), at no cost in the fitted bound.
FIT_RIDGE = 1e-8
EXP_TOL = 2e-5  # truncation of the Taylor series of exp on the scaled range
# exp's Taylor series runs on L / 2^s with a radius at most this, at the fewest products (one
# fewer than a radius of 0.5 on most plans). Unscaled, radius 2-3.6 at degree 11-14 lost accuracy
# in fp16 (measured err/gap 0.28-0.33 against 0.10-0.15 at 1024 x 1024, p = 1/16).
EXP_MAX_SCALED = 1.1
# The read-out's map from L to the weight (module docstring, "Read-out"): "quartic" is E = q(L),
# q the degree-4 Taylor polynomial of e^(x/2), 2 products; "exp" is exp(L / 2) to EXP_TOL, 4-5
# products. Both then apply E (E C). L is fitted through the map, so the quartic costs the fit
# nothing (benchmarks/lift_fit.py part 6).
READOUTS = ("quartic", "exp")
DEFAULT_READOUT = "quartic"
QUARTIC = tuple(1.0 / (2.0**j * math.factorial(j)) for j in range(5))  # q(x) = Σ_j QUARTIC[j] x^j
# The largest E on any direction (~e^4): accepted tall plans reach 45 (exp's reached 35), measured
# within the bar (docs/spectral.md, "log_ns")
MAX_E = 60.0
MIN_TAU = 1e-5  # an explicit rtol smaller than this is cut here (16-bit data never needs it)
MAX_TAU = 0.05


@dataclass(frozen=True)
class Plan:
    """The host side of one log_ns run (float64 scalars).

    steps: the X phase's ``(a, b, c)`` quintics (k1 >= 1); gram: the Gram phase's ``(a, b)``
    quadratics (k2); ``ymax``: the Chebyshev interval ``[0, ymax_k]`` of each ``G_0..G_K``
    (K = k1 + k2); ``coef``: ``c_0``, then ``(c_k1, c_k2)`` for k < K, then the ``FINAL_DEGREE``
    coefficients of ``Z_K``; ``center``/``squarings``/``taylor``: with ``readout="exp"``,
    ``exp(L) = e^center (Σ_j (L - center)^j / (2^s)^j / j!)^(2^s)`` (the quartic: 0, 0, 4);
    ``bound``: max |ln(F(σ)/σ^p)| over ``σ in [floor, 1]`` in exact arithmetic; ``zero``: every σ
    below it maps to ~0; ``cut``: Chebyshev coefficients of the cut factor C in ``Z_K``; ``leak``:
    max ``|F(σ)| / floor^p`` over ``σ in [0, zero]``; ``readout``: ``"quartic"`` or ``"exp"``
    (module docstring); ``biggest``: the largest ``|E|`` on any direction in [0, 1].
    """

    power: float
    floor: float
    steps: tuple[tuple[float, float, float], ...]
    gram: tuple[tuple[float, float], ...]
    ymax: tuple[float, ...]
    coef: tuple[float, ...]
    center: float
    squarings: int
    taylor: int
    bound: float
    zero: float
    cut: tuple[float, ...]
    leak: float
    readout: str
    biggest: float


def _trajectory(steps, sigma: torch.Tensor) -> list[torch.Tensor]:
    """s_0 = sigma, s_1, ..., s_J of X steps (float64)."""
    out = [sigma]
    for q in steps:
        s = out[-1]
        out.append(s * step_h(q, s * s))
    return out


def _gram_values(steps, gram, sigma: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(the eigenvalues y_0..y_K of G_0..G_K in the direction of each sigma, s_{k1}) (float64)."""
    traj = _trajectory(steps, sigma)
    ys = [s * s for s in traj]
    for a, b in gram:
        ys.append(a * ys[-1] + b * ys[-1] ** 2)
    return ys, traj[-1]


def _basis(ys: list[torch.Tensor], ymax, final_degree: int = FINAL_DEGREE) -> torch.Tensor:
    """The fit's columns: 1, then T_1, T_2 of every y_k on [0, ymax_k] but the last, and
    T_1..T_final_degree of the last."""
    last = len(ymax) - 1
    cols = [torch.ones_like(ys[0])[:, None]]
    for k, top in enumerate(ymax):
        cols.append(poly_basis(ys[k], final_degree if k == last else 2, top)[:, 1:])
    return torch.cat(cols, dim=1)


def _exp_products(squarings: int, degree: int) -> int:
    """(n, n) products of exp(L) (:func:`_expm`): Z^2, Z^3, one per further block of 3, squarings."""
    return (2 if degree >= 3 else 1) + degree // 3 + squarings


def _exp_plan(lo: float, hi: float) -> tuple[float, int, int]:
    """(center, squarings, Taylor degree) for exp on [lo, hi] to EXP_TOL: the fewest products
    with the scaled radius at most EXP_MAX_SCALED (ties: more squarings, a smaller scaled
    radius)."""
    center, radius = 0.5 * (lo + hi), 0.5 * (hi - lo) * 1.05 + 1e-3
    best = None
    for squarings in range(max(0, math.ceil(math.log2(radius / EXP_MAX_SCALED))), MAX_SQUARINGS + 3):
        r, degree = radius / 2**squarings, 1
        while r ** (degree + 1) / math.factorial(degree + 1) * 2**squarings > EXP_TOL:
            degree += 1
        key = (_exp_products(squarings, degree), -squarings)
        if best is None or key < best[0]:
            best = (key, squarings, degree)
    return center, best[1], best[2]


def poly(coefs, x: torch.Tensor) -> torch.Tensor:
    """Σ_j coefs[j] x^j (float64, host)."""
    return sum(c * x**j for j, c in enumerate(coefs))


def derivative(coefs) -> tuple:
    """The coefficients of poly(coefs)'s derivative."""
    return tuple(j * c for j, c in enumerate(coefs) if j)


def _bisect(rising, target: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """x in [lo, hi] with rising(x) = target, for an increasing ``rising`` (float64, host)."""
    a, b = torch.full_like(target, lo), torch.full_like(target, hi)
    for _ in range(100):
        mid = 0.5 * (a + b)
        below = rising(mid) < target
        a, b = torch.where(below, mid, a), torch.where(below, b, mid)
    return 0.5 * (a + b)


@lru_cache(maxsize=8)
def rising_from(coefs: tuple[float, ...]) -> float:
    """The lowest x above which q = poly(coefs) is positive and increasing (q's largest root or
    turning point below 0), for a q with q(0) > 0 and q'(0) > 0 (float64, host)."""
    slope = derivative(coefs)
    x = torch.linspace(-40.0, 0.0, 40001, dtype=torch.float64)
    bad = (poly(coefs, x) <= 0) | (poly(slope, x) <= 0)
    if not bool(bad.any()):
        return -40.0
    start = float(x[bad.nonzero().max()])
    edge = lambda v: torch.minimum(poly(coefs, v), poly(slope, v))  # noqa: E731
    return float(_bisect(edge, torch.zeros(1, dtype=torch.float64), start, start + 1e-3)[0])


def through_map(target: torch.Tensor, coefs) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, d ln E^2 / dx at x) with ``ln E(x)^2 = target``, E = poly(coefs), or E = e^(x/2)
    where ``coefs`` is None: the values L is fitted to, and the row weights that make the fit's
    residuals errors of ln F (float64, host). Targets under E's rising range get its lower end."""
    if coefs is None:
        return target, torch.ones_like(target)
    slope = derivative(coefs)
    x = _bisect(lambda v: 2.0 * poly(coefs, v).log(), target, rising_from(coefs), 60.0)
    return x, 2.0 * poly(slope, x) / poly(coefs, x)


def _map(readout: str):
    """The read-out's E as Taylor coefficients in L, or None for exp."""
    return None if readout == "exp" else QUARTIC


def log_weight(x: torch.Tensor, coefs) -> torch.Tensor:
    """ln of the weight E^2 that L = x gives, E = poly(coefs), or E = e^(x/2) where ``coefs`` is
    None (float64, host)."""
    return x if coefs is None else 2.0 * poly(coefs, x).log()


def _fit(power: float, floor: float, zero: float, steps, gram, cut_degree: int = CUT_DEGREES[0],
         mid_weight: float = MID_WEIGHTS[0], readout: str = DEFAULT_READOUT,
         final_degree: int = FINAL_DEGREE) -> Optional[Plan]:
    """The plan of these steps: C fitted first, then L (through the read-out's map, so that
    ``ln F`` is what the fit keeps small); None where C dips under MIN_CUT on the band (float64,
    host). ``final_degree`` other than FINAL_DEGREE: benchmarks/lift_fit.py's square search."""
    f64 = torch.float64
    band = torch.logspace(math.log10(floor), 0.0, 3000, dtype=f64)
    mid = torch.logspace(math.log10(zero), math.log10(floor), 200, dtype=f64)
    low = torch.linspace(0.0, zero, 400, dtype=f64)
    full = torch.cat([torch.linspace(0.0, 1.0, 2001, dtype=f64), band])
    ys_full, _ = _gram_values(steps, gram, full)
    ymax = tuple(max(1.0, float(y.max())) for y in ys_full)
    (ys_b, s_b), (ys_m, s_m), (ys_l, s_l) = (_gram_values(steps, gram, g) for g in (band, mid, low))
    # C: 1 on the band, 0 below the zero point, a ramp in ln sigma between (loosely)
    ramp = (mid.log() - math.log(zero)) / (math.log(floor) - math.log(zero))
    y_last = torch.cat([ys_b[-1], ys_l[-1], ys_m[-1]])
    want = torch.cat([torch.ones_like(band), torch.zeros_like(low), ramp])
    weight = torch.cat([torch.ones_like(band), torch.full_like(low, CUT_LOW_WEIGHT), torch.full_like(mid, CUT_RAMP_WEIGHT)])
    cut, _ = lawson_fit(poly_basis(y_last, cut_degree, ymax[-1]) * weight[:, None], want * weight, 60, ridge=FIT_RIDGE)

    def c_of(ys):
        return poly_basis(ys[-1], cut_degree, ymax[-1]) @ cut

    c_band = c_of(ys_b)
    if float(c_band.min()) < MIN_CUT:
        return None
    # L: ln(sigma^p / s_k1) - ln C on the band; its natural continuation (lightly) down to the zero point
    target_b = power * band.log() - s_b.log() - c_band.log()
    coefs = _map(readout)
    (x_b, w_b), (x_m, w_m) = (through_map(t, coefs) for t in (target_b, power * mid.log() - s_m.log()))
    basis_b = _basis(ys_b, ymax, final_degree)
    rows = torch.cat([basis_b * w_b[:, None], mid_weight * _basis(ys_m, ymax, final_degree) * w_m[:, None]])
    rhs = torch.cat([x_b * w_b, mid_weight * x_m * w_m])
    coef, _ = lawson_fit(rows, rhs, 60, ridge=FIT_RIDGE)
    err = float((log_weight(basis_b @ coef, coefs) - target_b).abs().max())
    values = _basis(ys_full, ymax, final_degree) @ coef  # L on every direction, the ones under the floor included
    if readout == "exp":
        center, squarings, degree = _exp_plan(float(values.min()), float(values.max()))
        biggest = math.exp(0.5 * float(values.max()))
    else:
        center, squarings, degree = 0.0, 0, len(QUARTIC) - 1
        biggest = float(poly(coefs, values).abs().max())
    weight_low = s_l * torch.exp(log_weight(_basis(ys_l, ymax, final_degree) @ coef, coefs)) * c_of(ys_l)
    leak = float(weight_low.abs().max()) / floor**power
    return Plan(float(power), float(floor), tuple(steps), tuple(gram), ymax, tuple(coef.tolist()), center,
                squarings, degree, err, float(zero), tuple(cut.tolist()), leak, readout, biggest)


def x_steps_for(m: int, n: int) -> int:
    """k1, the X phase's length, for (m, n) matrices, m >= n (see :data:`TALL`)."""
    return TALL_X_STEPS if m >= TALL * n else SQUARE_X_STEPS


def make_plan(power: float, tau: float, x_steps: int, fit_target: float = FIT_TARGET,
              readout: str = DEFAULT_READOUT) -> Plan:
    """The plan for the normalised cutoff ``tau`` (:func:`normalised_cutoff`): it lifts from
    ``NOISE_LIFT tau`` and zeroes below ``NOISE_ZERO tau``. ``x_steps`` X steps
    (:func:`x_steps_for`), then the fewest Gram steps that lift the floor to FINAL_LOW with a
    well-posed fit (:func:`_well_posed`) within ``fit_target * power`` on ``[floor, 1]``; if a
    well-posed fit needs it, more X steps; the most accurate well-posed plan otherwise. A looser
    ``fit_target`` picks fewer steps (benchmarks/fast_ns_frontier.py's ``log_ns/fit0.07``)."""
    if not 0.0 < power < 1.0:
        raise ValueError(f"log_ns: power must be in (0, 1), got {power}")
    if not MIN_TAU <= tau <= MAX_TAU:
        raise ValueError(f"log_ns: tau (the cutoff over ||M||_F) must be in [{MIN_TAU}, {MAX_TAU}], got {tau}")
    if not 1 <= x_steps <= MAX_X_STEPS:
        raise ValueError(f"log_ns: x_steps must be in [1, {MAX_X_STEPS}], got {x_steps}")
    if readout not in READOUTS:
        raise ValueError(f"log_ns: readout must be one of {READOUTS}, got {readout!r}")
    return _plan(float(power), float(tau), int(x_steps), float(fit_target), readout)


@lru_cache(maxsize=256)
def _plan(power: float, tau: float, x_steps: int, fit_target: float, readout: str) -> Plan:
    floor, zero = NOISE_LIFT * tau, NOISE_ZERO * tau
    best = None
    for k1 in range(x_steps, MAX_X_STEPS + 1):
        steps = (X_STEP,) * k1
        for count in range(MAX_GRAM_STEPS + 1):
            gram = (GRAM_STEP,) * count
            ys, _ = _gram_values(steps, gram, torch.tensor([floor], dtype=torch.float64))
            if float(ys[-1]) < FINAL_LOW:  # the floor is not lifted into the band the final fit covers
                continue
            usable = []
            for degree in CUT_DEGREES:
                for weight in MID_WEIGHTS:
                    plan = _fit(power, floor, zero, steps, gram, degree, weight, readout)
                    if plan is None or not _well_posed(plan):
                        continue
                    if plan.bound <= fit_target * power:
                        return plan
                    usable.append(plan)
            if not usable:
                break  # more Gram steps only add collinear columns: one more X step instead
            best = min(usable + ([best] if best else []), key=lambda plan: plan.bound)
    if best is None:
        raise RuntimeError(f"log_ns: no schedule lifts {floor} within {MAX_X_STEPS} X and {MAX_GRAM_STEPS} Gram steps")
    return best


def _well_posed(plan: Plan) -> bool:
    """A fit whose coefficients stay small (rounding of each term is not amplified), whose E
    stays at most MAX_E (the quartic) or whose L stays in a range exp covers in a few squarings
    (exp) on every direction, those under the floor included, and whose cut keeps at most
    MAX_LEAK under the zero point. Long Gram phases from
    a low floor can fail this (near-collinear columns)."""
    fits_map = plan.squarings <= MAX_SQUARINGS if plan.readout == "exp" else plan.biggest <= MAX_E
    return max(abs(c) for c in plan.coef) <= MAX_COEF and fits_map and plan.leak <= MAX_LEAK


def plan_for(power: float, rtol: float, m: int, n: int, fit_target: float = FIT_TARGET,
             readout: str = DEFAULT_READOUT) -> Plan:
    """The plan for (m, n) matrices, m >= n, under the resolved cutoff ``rtol``."""
    return make_plan(float(power), normalised_cutoff(rtol, n), x_steps_for(m, n), fit_target, readout)


def normalised_cutoff(rtol: float, n: int) -> float:
    """The cutoff over ``||M||_F`` (``X_0``'s units): its Frobenius part under the noise rule
    (``τ = fro ||M||_F`` sits at ``fro``); an explicit float ``rtol`` (relative to σ_max >=
    ||M||_F / sqrt(n)) maps to ``rtol / sqrt(n)``. Rounded down to two significant digits so
    that nearby shapes share a cached plan."""
    fro = getattr(rtol, "fro", 0.0)
    raw = fro if fro > 0.0 else float(rtol) / math.sqrt(n)
    raw = min(max(raw, MIN_TAU), MAX_TAU)
    digits = 10 ** math.floor(math.log10(raw) - 1)
    return max(MIN_TAU, math.floor(raw / digits) * digits)


def _cheb_matrix(g: torch.Tensor, g2: torch.Tensor, ymax: float, eye: torch.Tensor):
    """(Z, T_2(Z)) for Z = 2G/ymax - I from G and G^2 (no product)."""
    z = (2.0 / ymax) * g - eye
    t2 = (8.0 / ymax**2) * g2 - (8.0 / ymax) * g + eye
    return z, t2


def _expm(l: torch.Tensor, plan: Plan, eye: torch.Tensor, dtype: torch.dtype, squarings: int) -> torch.Tensor:
    """exp(L / 2^(plan.squarings - squarings)) for symmetric L (b, n, n) float32 by the plan's
    Taylor degree (Paterson–Stockmeyer blocks of 3) and ``squarings`` of its squarings; every
    product 16-bit operands, float32 output."""
    z = (l - plan.center * eye) / 2**plan.squarings
    coef = [1.0 / math.factorial(j) for j in range(plan.taylor + 1)]
    z2 = precision.mm(z, z, dtype)
    z3 = precision.mm(z2, z, dtype) if plan.taylor >= 3 else None
    blocks = []
    for start in range(0, plan.taylor + 1, 3):
        c = coef[start : start + 3]
        blk = c[0] * eye
        if len(c) > 1:
            blk = blk + c[1] * z
        if len(c) > 2:
            blk = blk + c[2] * z2
        blocks.append(blk)
    out = blocks[-1]
    for blk in reversed(blocks[:-1]):
        out = blk + precision.mm(z3, out, dtype)
    for _ in range(squarings):
        out = precision.mm(out, out, dtype)
    return out * math.exp(plan.center / 2 ** (plan.squarings - squarings))


def series_degree(plan: Plan) -> int:
    """The Chebyshev degree of the plan's last Gram series (FINAL_DEGREE unless fitted otherwise):
    ``coef`` holds 1 + 2 K + degree terms for K + 1 Gram matrices."""
    return len(plan.coef) - 1 - 2 * (len(plan.ymax) - 1)


def run_plan(x: torch.Tensor, plan: Plan, dtype: torch.dtype = DEFAULT_DTYPE) -> torch.Tensor:
    """Applies ``plan`` to x (b, m, n), m >= n -> (b, m, n) float32 (module docstring)."""
    if dtype not in precision.SUPPORTED:
        raise ValueError(f"log_ns: dtype must be torch.float16, torch.bfloat16 or torch.float32, got {dtype}")
    first = x.dtype if x.dtype in precision.LOW_PRECISION else dtype

    def mm(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # all but the two products with X_0 (in `first`)
        return precision.mm(u, v, dtype)

    m, n = x.size(-2), x.size(-1)
    eye = torch.eye(n, dtype=torch.float32, device=x.device)
    amax = x.abs().amax(dim=(-2, -1), keepdim=True).to(torch.float32)
    amax = torch.where(amax > 0, amax, torch.ones_like(amax))
    two = torch.exp2(torch.ceil(torch.log2(amax)))  # a power of two: x0 is x, exactly, rescaled
    x0 = x.to(torch.float32) / two
    fro2 = x0.square().sum(dim=(-2, -1), keepdim=True)
    fro2 = torch.where(fro2 > 0, fro2, torch.ones_like(fro2))
    carry = 2.0 ** round(math.log2(math.sqrt(m)))  # X_k is held as carry * X_k (fp16 range)
    coef = plan.coef
    lmat = coef[0] * eye
    pos = 1

    def add_terms(k: int, gram: torch.Tensor, gram2: torch.Tensor) -> None:
        nonlocal lmat, pos
        z, t2 = _cheb_matrix(gram, gram2, plan.ymax[k], eye)
        lmat = lmat + coef[pos] * z + coef[pos + 1] * t2
        pos += 2

    # X phase: G_k from the lifted X_k, k < k1; ends with X_{k1} (plans have k1 >= 1)
    xk = x0
    for k, q in enumerate(plan.steps):
        if k == 0:
            gram = precision.mm(x0.mT, x0, first) / fro2  # G_0 of X_0 = x0 / ||x0||_F
        else:
            gram = mm(xk.mT, xk) / carry**2
        gram2 = mm(gram, gram)
        add_terms(k, gram, gram2)
        step = q[0] * eye + q[1] * gram + q[2] * gram2
        if k == 0:  # fold 1/||x0||_F and the carry into the right factor: x0 is exact in `first`
            xk = precision.mm(x0, step * (carry * torch.rsqrt(fro2)), first)
            del x0  # memory: from here only X_k (float32) and (n, n) matrices are alive
        else:
            xk = mm(xk, step)
    # Gram phase: one (n, n) product per step gives T_2 of G_j and G_{j+1}
    k = len(plan.steps)
    gram = mm(xk.mT, xk) / carry**2
    for a, b in plan.gram:
        gram2 = mm(gram, gram)
        add_terms(k, gram, gram2)
        gram = a * gram + b * gram2
        gram = 0.5 * (gram + gram.mT)
        k += 1
    # T_1..T_FINAL_DEGREE of the last Gram, by Paterson-Stockmeyer blocks; the cut factor reuses
    # their T_2..T_k
    z, t2 = _cheb_matrix(gram, mm(gram, gram), plan.ymax[k], eye)
    basis: list = []
    lmat = lmat + chebyshev.matrix_series((0.0,) + coef[pos:], z, eye, mm, t2=t2, basis=basis)
    lmat = 0.5 * (lmat + lmat.mT)
    cut = chebyshev.matrix_series(plan.cut, z, eye, mm, t2=t2, k=chebyshev.baby_degree(series_degree(plan)), basis=basis)
    if plan.readout == "quartic":  # E (E C) with E = q(L) ~ e^(L / 2): E's rounding is ~max E, not its square
        c = QUARTIC
        l2 = mm(lmat, lmat)
        half = (c[0] * eye + c[1] * lmat + c[2] * l2) + mm(l2, c[3] * lmat + c[4] * l2)
        weight = mm(half, mm(half, cut))
    elif plan.squarings >= 1:  # E (E C) with E = exp(L / 2): E's rounding is ~e^(max L / 2), not e^(max L)
        half = _expm(lmat, plan, eye, dtype, plan.squarings - 1)
        weight = mm(half, mm(half, cut))
    else:
        weight = precision.mm_split(_expm(lmat, plan, eye, dtype, 0), cut, dtype)
    out = mm(xk, weight) / carry
    return out.mul_((two * fro2.sqrt()) ** plan.power)


def log_ns_power(x: torch.Tensor, power: float, rtol: float, dtype: torch.dtype = DEFAULT_DTYPE) -> torch.Tensor:
    """``U Σ^p V^T`` of each matrix of x (b, m, n), m >= n -> (b, m, n) float32.

    rtol: the resolved cutoff (a :class:`.cutoff.Cutoff` from ``default_rtol``, or a float); it
    is raised to the noise cutoff of the coarsest 16-bit format the values pass through (x's own
    dtype if 16-bit, else ``dtype``). p = 0 is Muon's polar factor: use ``polar_express``/``ns5``.
    """
    if power == 1.0:
        return x.to(torch.float32)
    if not 0.0 < power < 1.0:
        raise ValueError(
            f"log_ns: power must be in (0, 1], got {power}; for Muon (power 0) use 'polar_express' or 'ns5'"
        )
    rtol = operand_cutoff(rtol, x, dtype)
    return run_plan(x, plan_for(power, rtol, x.size(-2), x.size(-1)), dtype)


def plan_products(plan: Plan) -> dict[str, int]:
    """Products of one matrix by kind: ``"mn2"`` (the Gram X^T X or X·W: 2 m n^2 FLOPs each)
    and ``"n3"`` (n x n by n x n: 2 n^3 FLOPs each)."""
    k1, k2 = len(plan.steps), len(plan.gram)
    degree = series_degree(plan)
    mn2 = 2 * k1 + 2  # G_k and X_{k+1} per X step, G_{k1}, the final X_{k1} W
    n3 = k1 + k2 + 1 + chebyshev.products(degree, t2_given=True)  # every G_k^2; the last series
    n3 += chebyshev.products(len(plan.cut) - 1, chebyshev.baby_degree(degree), basis_given=True)  # C
    if plan.readout == "quartic":
        n3 += 2 + 2  # E = q(L): u^2, u^2 (..); then E C, E (E C)
    else:  # exp(L / 2) is exp(L) less one squaring, then E C, E (E C); exp(L) C in two terms
        n3 += _exp_products(plan.squarings, plan.taylor) + (1 if plan.squarings >= 1 else 2)
    return {"mn2": mn2, "n3": n3}


def log_ns_cost(m: int, n: int, power: float = 0.125) -> float:
    """FLOPs of one (m, n) matrix, m >= n, all 16-bit operands, for bf16 data's noise cutoff."""
    eps = torch.finfo(torch.bfloat16).eps
    counts = plan_products(plan_for(power, noise_cutoff((m, n), eps), m, n))
    return 2.0 * m * n * n * counts["mn2"] + 2.0 * n**3 * counts["n3"]


def log_ns_workspace(m: int, n: int) -> float:
    """Bytes beyond input and output: the float32 input copy and X_k with its next value (3 x
    4mn), one operand's 16-bit copy and its float32 widening on the CPU (2mn + 4mn), and ~16
    float32 (n, n) matrices (G, G^2, Z, T_j, L, exp's powers and blocks, C, exp(L)'s two terms;
    the quartic read-out needs fewer: L^2, E, E C). The CPU allocator's measured peak is 0.54-0.73
    of this (tests/test_log_ns.py); the plan's host-side fit is not counted."""
    return 18.0 * m * n + 64.0 * n * n


register_method(
    SpectralMethod(
        name="log_ns",
        fn=log_ns_power,
        cost=log_ns_cost,
        exact=False,
        powers="any",
        description=(
            "approximate, matmul-only in fp16/bf16 with fp32 accumulation: Newton-Schulz lift, "
            "then Gram-space quadratic steps, with a joint log-domain fit of sigma^p and a soft "
            "rank cut (lifts from 1.25x the noise cutoff, zeroes below 0.45x); for 16-bit "
            "momenta on GPUs"
        ),
        workspace=log_ns_workspace,
    )
)
