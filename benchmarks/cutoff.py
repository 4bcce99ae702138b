"""The rank cutoff on bf16 matrices: the noise-following rule against the former fixed one.

    python benchmarks/cutoff.py                      # shapes 172x64, 64x172, 256x128, 512x512
    python benchmarks/cutoff.py --shapes 1024x256 --method eigh

Part 1 measures the rounding noise itself: for exactly rank-deficient float64 matrices rounded
to bf16/fp16/fp32, the largest singular value that rounding created, divided by
``eps ||M||_F (sqrt(m) + sqrt(n)) / sqrt(mn)`` (the rule's unit; the cutoff is NOISE_MULTIPLE
times it). Part 2 prints err/bar (error against the float64 reference over the HTMuon bar,
<= 1 passes) at p = 1/8 for "keep" (full-rank spectra in bf16; reference: the exact update of
the bf16 values) and "drop" (rank-deficient matrices rounded to bf16; reference: the exact
update of the unrounded matrix) under three cutoffs: the rule, the former 4 eps sigma_max, none.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from htmuon_dist.spectral import spectral_power  # noqa: E402
from htmuon_dist.spectral.accuracy import bar, random_orthonormal, reference, rel_err  # noqa: E402
from htmuon_dist.spectral.cutoff import NOISE_MULTIPLE  # noqa: E402


def deficient(kind: str, m: int, n: int, gen: torch.Generator) -> tuple[torch.Tensor, int]:
    k = min(m, n)
    r = k // 4
    g = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    if kind == "rank k/4":
        return g(m, r) @ g(r, n), r
    if kind == "centred rows":  # LayerNorm-style gradient: G 1 = 0
        x = g(max(m, n), n)
        x = x - x.mean(dim=1, keepdim=True)
        return g(max(m, n), m).T @ x, min(m, n - 1)
    if kind == "hetero rows":
        return torch.exp(1.5 * g(m, 1)) * (g(m, r) @ g(r, n)), r
    if kind == "spike + rank k/4":
        u, v = g(m, 1), g(n, 1)
        return 30.0 * math.sqrt(r) * (u @ v.T) / (u.norm() * v.norm()) + g(m, r) @ g(r, n) / math.sqrt(m * n) * math.sqrt(m * n), r + 1
    raise ValueError(kind)


def full_rank(kind: str, m: int, n: int, gen: torch.Generator) -> torch.Tensor:
    k = min(m, n)
    i = torch.arange(1, k + 1, dtype=torch.float64)
    s = {"1/i": 1.0 / i, "log to 1e-2": torch.logspace(0, -2, k, dtype=torch.float64),
         "log to 1e-3": torch.logspace(0, -3, k, dtype=torch.float64)}[kind]
    return (random_orthonormal(m, k, gen) * s) @ random_orthonormal(n, k, gen).T


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="172x64,64x172,256x128,512x512", help="comma list of MxN")
    ap.add_argument("--method", default="eigh", help="spectral method for part 2")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    gen = torch.Generator().manual_seed(args.seed)
    print(f"Part 1: largest rounding-made singular value / (eps ||M||_F (sqrt m + sqrt n) / sqrt(mn)); "
          f"the cutoff is {NOISE_MULTIPLE} of that unit")
    kinds = ["rank k/4", "centred rows", "hetero rows", "spike + rank k/4"]
    print(f"{'shape':>9} {'dtype':>9}" + "".join(f"{k:>18}" for k in kinds))
    worst = 0.0
    for m, n in shapes:
        for dt in (torch.bfloat16, torch.float16, torch.float32):
            cells = []
            for kind in kinds:
                exact, r = deficient(kind, m, n, gen)
                x = exact.to(dt).double()
                s = torch.linalg.svdvals(x)
                unit = torch.finfo(dt).eps * x.norm() * (math.sqrt(m) + math.sqrt(n)) / math.sqrt(m * n)
                ratio = float(s[r] / unit) if r < s.numel() else 0.0
                worst = max(worst, ratio)
                cells.append(ratio)
            print(f"{m}x{n:<5} {str(dt)[6:]:>9}" + "".join(f"{c:18.3f}" for c in cells))
    print(f"worst: {worst:.3f}\n")
    p = 0.125
    eps = 2.0**-7
    print(f"Part 2: err/bar at p = {p}, method {args.method}, bf16 data (computed as an fp32 copy with eps = 2^-7)")
    print(f"{'shape':>9} {'case':<24} {'rule':>8} {'4 eps':>8} {'none':>8}")
    for m, n in shapes:
        for kind in ("1/i", "log to 1e-2", "log to 1e-3"):
            x = full_rank(kind, m, n, gen).to(torch.bfloat16).float()
            r, pol = reference(x, p, rtol=0.0)
            _row(m, n, f"keep {kind}", x, r, pol, args.method, eps)
        for kind in kinds:
            exact, _ = deficient(kind, m, n, gen)
            x = exact.to(torch.bfloat16).float()
            r, pol = reference(exact, p, rtol=1e-10)
            _row(m, n, f"drop {kind}", x, r, pol, args.method, eps)


def _row(m, n, label, x, r, pol, method, eps) -> None:
    b = bar(r, pol)
    vals = [rel_err(spectral_power(x, 0.125, method=method, eps=eps), r) / b,
            rel_err(spectral_power(x, 0.125, method=method, rtol=4 * eps), r) / b,
            rel_err(spectral_power(x, 0.125, method=method, rtol=0.0), r) / b]
    print(f"{m}x{n:<5} {label:<24}" + "".join(f"{v:8.2f}" for v in vals), flush=True)


if __name__ == "__main__":
    main()
