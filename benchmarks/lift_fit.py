"""Why a matmul-only Σ^p does not reach 1.5x NS5 here: the numbers behind docs/spectral.md's
"Why an X-space lift alone does not reach 1.5x NS5", computed on the host in float64 (no matrices, no timing).

    python benchmarks/lift_fit.py                  # ~30 s on one CPU core
    python benchmarks/lift_fit.py --floor 2e-4 --steps 6,7,8
    python benchmarks/lift_fit.py --optimise-steps 7   # part 5 with free steps too (~3 min, scipy)
    python benchmarks/lift_fit.py --skip-soft-cut --square-search --floor 4.25e-4   # part 7 at 2048^2's floor

It prints six things (seven with ``--square-search``):

1. **monotone lift**: the largest slope at 0 of an odd quintic ``p(s) = a s + b s^3 + c s^5`` with
   ``p' >= 0`` and ``p <= 1`` on [0, 1] (a linear program on a grid): the fastest lift that keeps
   every singular value's trajectory one-to-one, and the steps it needs from ``--floor``;
2. **joint log fit per step family**: for J repetitions of a step quintic (or the Polar Express
   schedule), the best near-minimax fit (Lawson) of ``p ln σ - ln s_J(σ)`` on ``[floor, 1]`` by
   Chebyshev terms ``T_1, T_2`` of every ``y_k = s_k^2`` and ``T_1..T_d`` of the last one, the
   basis ``log_ns`` uses; printed as the largest log error divided by p, for p = 1/16 and 1/4;
   ``log_ns`` accepts a plan at ``<= 0.035``;
3. **soft cuts on a square Gaussian spectrum**: err/gap of the exact singular values with the
   exact method's hard cut at the noise cutoff τ replaced by a smoothstep between two multiples
   of τ (1024x1024, bf16-rounded, p = 1/16, 1/8, 1/4): what any method without a hard cut at
   exactly τ gives up there.
4. **the polar factor's price at the same floor**: Polar Express's band after 5-8 steps from
   ``--floor`` (3 products per step at square, NS5's) beside the products of ``log_ns``'s square
   plan at that floor: what an accurate Muon costs there, against an HTMuon that must keep every
   σ apart to read σ^p off;
5. **the free read-out**: the best near-minimax fit of ``σ^p`` on ``[floor, 1]`` (relative error,
   no rank cut: its best case) by a linear combination of the lift's own iterates
   ``s_0 = σ, s_1, ..., s_J``. Each ``X_k = U s_k(Σ) V^T`` is computed by the lift anyway, so this
   read-out costs no product at all, and folds do no harm (the basis is a fixed set of functions).
   Exact minimax by a linear program with scipy, else Lawson's iterate (an upper bound).
   Printed beside a quarter of the 1024x1024 Gaussian's gap at each p (part 3's spectrum), which
   a uniform relative error must stay under to meet the bar;
6. **the read-out's map**: ``log_ns``'s square schedule (3 X steps, then Gram steps) and basis,
   with the weight ``σ^p / s_3`` written as ``E(L)^2`` for several maps E (Taylor polynomials of
   ``e^(L/2)`` of degree 1-4, and ``e^(L/2)`` itself), L fitted through the map, and as the basis
   itself (``W = L``, the direct fit): the largest log error / p, and the products each map
   costs at square. The degree-4 Taylor polynomial fits as well as exp for 2 products instead
   of 4-5, which is why ``log_ns`` reads out with it; the direct fit misses by ~30x.
7. **the square search** (``--square-search``): ``log_ns``'s knobs at square shapes (final degree,
   X steps, the Gram lift, Gram steps, cut degree) with the quartic read-out at p = 1/8, and the
   best fit per product count: how far the design is from 22.5 products (1.5x NS5).
"""

from __future__ import annotations

import argparse
import math
import sys
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from htmuon_dist.spectral import default_rtol  # noqa: E402
from htmuon_dist.spectral import log_ns  # noqa: E402
from htmuon_dist.spectral.newton_schulz import NS5_COEFFS  # noqa: E402
from htmuon_dist.spectral import polar_express as pe  # noqa: E402
from htmuon_dist.spectral.cutoff import threshold  # noqa: E402
from htmuon_dist.spectral.tracked_ns import lawson_fit  # noqa: E402

FAMILIES = {
    "2.6x (mild)": (2.6, -3.12, 1.04),
    "3.0x (log_ns mild)": log_ns.X_STEP,
    "3.44x (Jordan NS5)": NS5_COEFFS,
}


def monotone_lift() -> float:
    """Max a of a s + b s^3 + c s^5 with 0 <= p' and p <= 1 on [0, 1] (scipy if present, else a
    closed-form check of the known optimum)."""
    try:
        from scipy.optimize import linprog
    except ImportError:  # the optimum the LP finds: 2.25 s - 2.5 s^3 + 1.25 s^5
        return 2.25
    s = torch.linspace(0.0, 1.0, 3001, dtype=torch.float64)
    value = torch.stack([s, s**3, s**5], dim=1)
    slope = torch.stack([torch.ones_like(s), 3 * s**2, 5 * s**4], dim=1)
    res = linprog([-1.0, 0.0, 0.0], A_ub=torch.cat([value, -slope]).numpy(),
                  b_ub=torch.cat([torch.ones_like(s), torch.zeros_like(s)]).numpy(),
                  bounds=[(None, None)] * 3)
    return float(res.x[0])


def joint_fit(steps, power: float, floor: float, final_degree: int) -> float:
    """Largest |fit - (p ln σ - ln s_J)| over [floor, 1], divided by p (inf if a step blows up)."""
    sigma = torch.logspace(math.log10(floor), 0.0, 1500, dtype=torch.float64)
    traj = log_ns._trajectory(steps, sigma)
    traj_full = log_ns._trajectory(steps, torch.linspace(0.0, 1.0, 1001, dtype=torch.float64))
    if not all(torch.isfinite(t).all() and t.abs().max() < 10 for t in traj_full):
        return math.inf
    ymax = tuple(max(1.0, float((t * t).max())) for t in traj_full[:-1])
    target = power * sigma.log() - traj[-1].abs().clamp_min(1e-300).log()
    _, err = lawson_fit(log_ns._basis([t * t for t in traj[:-1]], ymax, final_degree), target, 40)
    return err / power


@lru_cache(maxsize=2)
def gaussian_spectrum(n: int = 1024, seed: int = 3) -> tuple[torch.Tensor, float]:
    """Singular values (float64) of a bf16-rounded square Gaussian with σ_max 1, and its cutoff τ."""
    gen = torch.Generator().manual_seed(seed)
    mat = torch.randn(n, n, generator=gen, dtype=torch.float64)
    x = (mat / torch.linalg.matrix_norm(mat, ord=2)).to(torch.bfloat16)
    s = torch.linalg.svdvals(x.double())
    return s, float(threshold(s[None], default_rtol(torch.bfloat16, x.shape)))


def exact_and_gap(s: torch.Tensor, tau: float, power: float) -> tuple[torch.Tensor, float]:
    """The exact values (σ^p above τ, 0 under) and the relative distance of the best rescaled polar factor."""
    keep = (s > tau).double()
    ref = keep * s.pow(power)
    c = (keep * ref).sum() / keep.sum()
    return ref, float((c * keep - ref).norm() / ref.norm())


def soft_cut_table(n: int = 1024) -> list[str]:
    s, tau = gaussian_spectrum(n)
    lines = [f"square {n}x{n} Gaussian (bf16): {float((s < 2 * tau).double().mean()):.1%} of the singular values "
             f"under 2 tau; err/gap of the exact values with the hard cut at tau replaced by a smoothstep:"]
    bands = [(0.8, 1.25), (0.7, 1.4), (0.5, 1.0), (0.5, 2.0), (0.25, 1.0)]
    lines.append("  p       " + "".join(f"[{lo:g},{hi:g}] tau".rjust(18) for lo, hi in bands) + "      no cut")
    for power in (1 / 16, 1 / 8, 1 / 4):
        ref, gap = exact_and_gap(s, tau, power)
        row = []
        for lo, hi in bands:
            t = ((s / tau).log() - math.log(lo)) / (math.log(hi) - math.log(lo))
            t = t.clamp(0.0, 1.0)
            y = s.pow(power) * t * t * (3 - 2 * t)
            row.append(float((y - ref).norm() / ref.norm()) / gap)
        none = float((s.pow(power) - ref).norm() / ref.norm()) / gap
        lines.append(f"  {power:<8.4g}" + "".join(f"{v:18.2f}" for v in row) + f"{none:12.2f}")
    return lines


def polar_peer(floor: float, counts: list[int]) -> list[str]:
    """The polar factor's own price at this floor (Polar Express, which folds freely: sign(σ) = 1
    needs no σ told apart), beside log_ns's square plan (which must keep σ apart to read σ^p)."""
    lines = [f"square n x n, floor {floor:g} (products of n^3; bf16 NS5 = 15, the 1.5x target = 22.5):"]
    for j in counts:
        lo, hi = pe.band(floor, j)
        lines.append(f"   Polar Express, {j} steps: {3 * j:>3} products ({3 * j / 15:.2f}x NS5), "
                     f"every σ >= floor ends in [{lo:.4f}, {hi:.4f}]")
    for power in (1 / 16, 1 / 8, 1 / 4):
        plan = log_ns.make_plan(power, floor / log_ns.NOISE_LIFT, log_ns.SQUARE_X_STEPS)
        c = log_ns.plan_products(plan)
        total = c["mn2"] + c["n3"]
        lines.append(f"   log_ns at p = {power:g}: {total:>3} products ({total / 15:.2f}x NS5): {len(plan.steps)} X steps, "
                     f"{len(plan.gram)} Gram steps, the {plan.readout} read-out")
    return lines


def iterate_fit(steps, power: float, floor: float) -> float:
    """Largest relative error of the best fit of σ^p on [floor, 1] by sum_k c_k s_k(σ), k = 0..J."""
    sigma = torch.logspace(math.log10(floor), 0.0, 1500, dtype=torch.float64)
    traj = torch.stack(log_ns._trajectory(steps, sigma), dim=1)
    rows = traj / sigma.pow(power)[:, None]  # relative error: fit rows @ c ~ 1
    try:
        from scipy.optimize import linprog
    except ImportError:  # Lawson's iterate: an upper bound on the minimax error
        return lawson_fit(rows, torch.ones_like(sigma), 200)[1]
    # the exact minimax: min e subject to |rows @ c - 1| <= e
    k = rows.size(1)
    a_ub = torch.cat([torch.cat([rows, -torch.ones_like(sigma)[:, None]], 1),
                      torch.cat([-rows, -torch.ones_like(sigma)[:, None]], 1)])
    b_ub = torch.cat([torch.ones_like(sigma), -torch.ones_like(sigma)])
    res = linprog([0.0] * k + [1.0], A_ub=a_ub.numpy(), b_ub=b_ub.numpy(),
                  bounds=[(None, None)] * k + [(0.0, None)], method="highs")
    return float(res.x[-1])


def optimised_iterate_fit(j: int, power: float, floor: float, start) -> float:
    """iterate_fit with all 3j step coefficients free: a local search (Powell, scipy) from ``start``
    repeated j times; steps whose values leave [-10, 10] on [0, 1] are rejected."""
    from scipy.optimize import minimize

    unit = torch.linspace(0.0, 1.0, 301, dtype=torch.float64)

    def objective(theta) -> float:
        steps = tuple(tuple(float(v) for v in theta[3 * k:3 * k + 3]) for k in range(j))
        if not all(torch.isfinite(t).all() and t.abs().max() < 10 for t in log_ns._trajectory(steps, unit)):
            return 10.0
        return iterate_fit(steps, power, floor)

    res = minimize(objective, list(start) * j, method="Powell", options={"maxfev": 6000, "xtol": 1e-5, "ftol": 1e-7})
    return float(res.fun)


def free_readout(floor: float, counts: list[int], gaps: Optional[dict[float, float]]) -> list[str]:
    powers = (1 / 16, 1 / 8, 1 / 4)
    head = "largest relative error of sum_k c_k s_k(σ) against σ^p on [floor, 1], p = 1/16 / 1/8 / 1/4"
    lines = [f"the free read-out (floor {floor:g}, square: 3J products, 1.5x NS5 = 22.5): {head}"]
    if gaps is not None:
        lines.append("   a quarter of the 1024x1024 Gaussian's gap: " + " / ".join(f"{0.25 * gaps[p]:.4f}" for p in powers))
    lines.append(f"   {'step family':<24}" + "".join(f"{'J=' + str(j):>26}" for j in counts))
    families = {name: (lambda j, q=q: (q,) * j) for name, q in FAMILIES.items()}
    families["Polar Express (8x..)"] = lambda j: tuple(tuple(c) for c in pe._applied(floor, j))
    for name, make in families.items():
        cells = []
        for j in counts:
            e = [iterate_fit(make(j), p, floor) for p in powers]
            cells.append(" / ".join(f"{v:.4f}" for v in e))
        lines.append(f"   {name:<24}" + "".join(f"{c:>26}" for c in cells))
    return lines


READOUT_MAPS = {  # name: (Taylor coefficients of E in L, or None for E = e^(L/2); products for E at square)
    "E = 1 + L/2": (log_ns.QUARTIC[:2], "0"),
    "E = Taylor 2 of e^(L/2)": (log_ns.QUARTIC[:3], "1"),
    "E = Taylor 3 of e^(L/2)": (log_ns.QUARTIC[:4], "2"),
    "E = Taylor 4 (log_ns)": (log_ns.QUARTIC, "2"),
    "E = exp(L/2) (log_ns before)": (None, "4-5"),
}


def readout_map_errors(floor: float, gram_steps: int, powers=(1 / 16, 1 / 8, 1 / 4)) -> dict[str, list[float]]:
    """Largest |ln F - ln σ^p| / p on [floor, 1] of log_ns's square basis fitted through each read-out
    map (the weight is E(L)^2, L in the basis's span, fitted as log_ns fits it: through the map, rows
    weighted by its log slope), and ("W = L (direct)") of the weight fitted as the basis itself, per
    power (float64, no cut)."""
    band = torch.logspace(math.log10(floor), 0.0, 3000, dtype=torch.float64)
    full = torch.cat([torch.linspace(0.0, 1.0, 2001, dtype=torch.float64), band])
    steps, gram = (log_ns.X_STEP,) * log_ns.SQUARE_X_STEPS, (log_ns.GRAM_STEP,) * gram_steps
    ymax = tuple(max(1.0, float(y.max())) for y in log_ns._gram_values(steps, gram, full)[0])
    ys, s_last = log_ns._gram_values(steps, gram, band)
    basis = log_ns._basis(ys, ymax)
    errors: dict[str, list[float]] = {name: [] for name in ["W = L (direct)", *READOUT_MAPS]}
    for power in powers:
        target = power * band.log() - s_last.log()
        ratio = target.exp()
        direct, _ = lawson_fit(basis / ratio[:, None], torch.ones_like(ratio), 100, ridge=1e-10)
        errors["W = L (direct)"].append(float(((basis @ direct).log() - target).abs().max()) / power)
        for name, (coefs, _) in READOUT_MAPS.items():
            x, slope = log_ns.through_map(target, coefs)
            coef, _ = lawson_fit(basis * slope[:, None], x * slope, 60, ridge=log_ns.FIT_RIDGE)
            errors[name].append(float((log_ns.log_weight(basis @ coef, coefs) - target).abs().max()) / power)
    return errors


def readout_maps(floor: float, gram_steps: list[int]) -> list[str]:
    lines = [f"the read-out's map (log_ns's square schedule and basis, floor {floor:g}): the weight "
             "σ^p / s_3 as E(L)^2 with L fitted through the map, largest |ln error| / p at p = 1/16 / 1/8 / 1/4 "
             "(log_ns accepts <= 0.035; products to form E from L at square in brackets; every map then "
             "spends E C and E (E C), the direct W = L only L C)"]
    names = ["W = L (direct)", *READOUT_MAPS]
    tables = {count: readout_map_errors(floor, count) for count in gram_steps}
    lines.append(f"   {'map':<36}" + "".join(f"{f'{count} Gram steps':>26}" for count in gram_steps))
    for name in names:
        label = f"{name} [{READOUT_MAPS[name][1]}]" if name in READOUT_MAPS else f"{name} [0]"
        lines.append(f"   {label:<36}" + "".join(
            f"{' / '.join(f'{v:.4f}' for v in tables[count][name]):>26}" for count in gram_steps))
    return lines


SEARCH_DEGREES, SEARCH_X_STEPS, SEARCH_GRAM_LIFTS = (4, 6, 8), (1, 2, 3), (2.58, 2.8, 3.0, 3.3, 3.6)


def square_search(floor: float, power: float) -> list[str]:
    """log_ns's knobs at square shapes with the quartic read-out: every final degree, X step count
    and Gram lift a of SEARCH_*, Gram steps 4-15 (until a well-posed fit within FIT_TARGET), the
    cut degrees log_ns tries; per product count (n^3 units at square), the best fit's |ln error| / p
    (exact arithmetic, host)."""
    from htmuon_dist.spectral import chebyshev

    best: dict[int, tuple[float, str]] = {}
    for degree in SEARCH_DEGREES:
        for k1 in SEARCH_X_STEPS:
            print(f"   ... square search: final degree {degree}, {k1} X step(s)", file=sys.stderr, flush=True)
            for a in SEARCH_GRAM_LIFTS:
                for k2 in range(4, 16):
                    steps, gram = (log_ns.X_STEP,) * k1, ((a, -a * a / 4.0),) * k2
                    plans = [log_ns._fit(power, floor, floor * log_ns.NOISE_ZERO / log_ns.NOISE_LIFT, steps, gram,
                                         cut, log_ns.MID_WEIGHTS[0], final_degree=degree) for cut in log_ns.CUT_DEGREES]
                    plans = [plan for plan in plans if plan is not None and log_ns._well_posed(plan)]
                    for plan in plans:  # a higher cut degree may cost a product more
                        total = sum(log_ns.plan_products(plan).values())
                        what = f"final degree {degree}, {k1} X, {k2} Gram steps of {a}, cut degree {len(plan.cut) - 1}"
                        if total not in best or plan.bound < best[total][0]:
                            best[total] = (plan.bound, what)
                    if any(plan.bound <= log_ns.FIT_TARGET * power for plan in plans):
                        break  # more Gram steps only cost more
    lines = [f"square search (quartic read-out, p = {power:g}, floor {floor:g}; well-posed plans only): the best "
             f"|ln error| / p per product count (log_ns accepts <= {log_ns.FIT_TARGET}; 1.5x NS5 = 22.5 products)"]
    for total in sorted(best):
        bound, what = best[total]
        mark = "  within the bound" if bound <= log_ns.FIT_TARGET * power else ""
        lines.append(f"   {total:>3} products ({total / 15:.2f}x NS5): {bound / power:9.4f}  ({what}){mark}")
    return lines


def optimised_readout(floor: float, j: int, power: float) -> list[str]:
    lines = [f"   every step's coefficients free (J = {j}, p = {power:g}; Powell, a local search):"]
    for name in ("3.0x (log_ns mild)", "3.44x (Jordan NS5)"):
        print(f"   ... optimising {3 * j} step coefficients from {name} (Powell, up to 6000 fits)", file=sys.stderr, flush=True)
        lines.append(f"     from {name:<22} {optimised_iterate_fit(j, power, floor, FAMILIES[name]):.4f}")
    return lines


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--floor", type=float, default=3e-4,
                    help="lowest normalised singular value to lift (the bf16 noise cutoff over ||M||_F: "
                         "2e-4 to 5e-4 at the LLaMA-1B/7B shapes)")
    ap.add_argument("--steps", default="6,7,8", help="comma list of step counts J")
    ap.add_argument("--final-degree", type=int, default=6, help="Chebyshev degree in the last Gram matrix")
    ap.add_argument("--optimise-steps", type=int, default=0, metavar="J",
                    help="part 5 also with all J steps' coefficients optimised at p = 1/8 (scipy; ~3 min for J = 7)")
    ap.add_argument("--skip-soft-cut", action="store_true", help="skip part 3 and part 5's gaps (an SVD, ~10 s)")
    ap.add_argument("--square-search", action="store_true",
                    help="part 7: search log_ns's knobs at square shapes for the fewest products within its fit bound "
                         "(p = 1/8, ~3 min)")
    args = ap.parse_args(argv)
    if not 0.0 < args.floor < 0.1:
        raise SystemExit(f"--floor must be in (0, 0.1), got {args.floor}")
    counts = [int(v) for v in args.steps.split(",") if v]
    if args.optimise_steps < 0 or args.optimise_steps > 12:
        raise SystemExit(f"--optimise-steps must be a step count in 1..12 (0: off), got {args.optimise_steps}")
    if args.optimise_steps:
        try:
            import scipy.optimize  # noqa: F401
        except ImportError:
            raise SystemExit("--optimise-steps needs scipy (pip install scipy)") from None
    if not counts or min(counts) < 1:
        raise SystemExit(f"--steps must list positive step counts, got {args.steps!r}")

    a = monotone_lift()
    print(f"1. monotone odd quintic: largest lift per step {a:.3f}x; from {args.floor:g} to 1 takes "
          f"{math.log(1 / args.floor) / math.log(a):.1f} steps (Jordan's folding step, 3.44x: "
          f"{math.log(1 / args.floor) / math.log(NS5_COEFFS[0]):.1f})")
    print(f"\n2. joint log fit (log_ns's basis, final degree {args.final_degree}, floor {args.floor:g}): "
          "largest log error / p at p = 1/16 and 1/4 (log_ns accepts <= 0.035)")
    print(f"   {'step family':<24}" + "".join(f"{'J=' + str(j):>16}" for j in counts))
    families = dict(FAMILIES)
    for name, q in families.items():
        cells = []
        for j in counts:
            e = [joint_fit((q,) * j, p, args.floor, args.final_degree) for p in (1 / 16, 1 / 4)]
            cells.append(f"{e[0]:7.3f}/{e[1]:.3f}" if math.isfinite(e[0]) else "diverges")
        print(f"   {name:<24}" + "".join(f"{c:>16}" for c in cells))
    cells = []
    for j in counts:
        sched = tuple(tuple(c) for c in pe._applied(args.floor, j))
        e = [joint_fit(sched, p, args.floor, args.final_degree) for p in (1 / 16, 1 / 4)]
        cells.append(f"{e[0]:7.3f}/{e[1]:.3f}" if math.isfinite(e[0]) else "diverges")
    print(f"   {'Polar Express (8x..)':<24}" + "".join(f"{c:>16}" for c in cells))
    if not args.skip_soft_cut:
        print("\n3. " + "\n".join(soft_cut_table()))
    print("\n4. the polar factor's price at the same floor against log_ns's, " + "\n".join(
        polar_peer(args.floor, list(range(5, 9)))))
    gaps = None if args.skip_soft_cut else {p: exact_and_gap(*gaussian_spectrum(), p)[1] for p in (1 / 16, 1 / 8, 1 / 4)}
    print("\n5. " + "\n".join(free_readout(args.floor, counts, gaps)))
    if args.optimise_steps:
        print("\n".join(optimised_readout(args.floor, args.optimise_steps, 1 / 8)))
    print("\n6. " + "\n".join(readout_maps(args.floor, [7, 8, 9])))
    if args.square_search:
        print("\n7. " + "\n".join(square_search(args.floor, 1 / 8)))


if __name__ == "__main__":
    main()
