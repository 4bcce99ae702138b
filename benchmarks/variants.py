"""Every spectral variant against the exact HTMuon update, and its CPU cost relative to NS5.

    python benchmarks/variants.py                                  # 256x128 and 512x256, fp32
    python benchmarks/variants.py --shapes 2048x512 --power 0.25      # other shapes and p
    python benchmarks/variants.py --shapes 1024x512 --repeat 3 --stream-steps 30

For each method, shape and spectrum: ``err = ||Y - R|| / ||R||`` with ``R = U Σ^p V^T`` the
exact update (float64 SVD of the same fp32 matrix, default rank cutoff), ``err_c`` the same
after the best scalar rescale of ``Y`` (methods whose step size differs, such as NS5 and ``ht``,
are compared up to scale there), and the time of one call over the time of Muon's NS5 (fp32,
best of ``--repeat`` after a warm-up, same run). ``stream`` is timed per step; its error is shown
cold (first step from the identity) and warm (after ``--stream-steps`` steps on a slowly
rotating matrix with the same spectrum). Columns: err per spectrum, the worst err and err_c.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/spectral.py

from htmuon_dist.spectral import available_methods, get_method, spectral_power  # noqa: E402
from htmuon_dist.spectral.accuracy import random_orthonormal, reference, rel_err  # noqa: E402
from spectral import best_time as _best_time  # noqa: E402
from htmuon_dist.spectral.newton_schulz import newton_schulz5  # noqa: E402
from htmuon_dist.spectral.stream import stream_power  # noqa: E402

SPECTRA = ("gaussian", "inv_i", "spike_bulk", "logspace")


def make(kind: str, m: int, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, s, V) in float64 and the fp32 matrix, with Frobenius norm 1."""
    k = min(m, n)
    if kind == "gaussian":
        u, s, vh = torch.linalg.svd(torch.randn(m, n, generator=gen, dtype=torch.float64), full_matrices=False)
        v = vh.T
    else:
        i = torch.arange(1, k + 1, dtype=torch.float64)
        s = {"inv_i": 1.0 / i, "logspace": torch.logspace(0, -4, k, dtype=torch.float64)}.get(kind)
        if kind == "spike_bulk":
            s = 1.0 + 0.1 * torch.rand(k, generator=gen, dtype=torch.float64)
            s[:3] *= torch.tensor([100.0, 30.0, 10.0], dtype=torch.float64)
        u, v = random_orthonormal(m, k, gen), random_orthonormal(n, k, gen)
    s = s / s.norm()
    return u, s, v, ((u * s) @ v.T).float()


def errors(y: torch.Tensor, r: torch.Tensor) -> tuple[float, float]:
    yd = y.double()
    c = (yd * r).sum() / (yd * yd).sum().clamp_min(1e-300)
    return rel_err(yd, r), rel_err(c * yd, r)


def best_time(fn: Callable[[], object], repeat: int) -> float:
    """Best CPU wall time of ``repeat`` calls after one warm-up (benchmarks/spectral.py's)."""
    return _best_time(fn, torch.device("cpu"), repeat)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="256x128,512x256", help="comma list of MxN")
    ap.add_argument("--power", type=float, default=0.125, help="p of the exact update (ns_roots needs 2^-k)")
    ap.add_argument("--repeat", type=int, default=3, help="timed calls per method (best is kept)")
    ap.add_argument("--stream-steps", type=int, default=30, help="warm-up steps of stream before its warm error")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    methods = sorted(n for n in available_methods()
                     if get_method(n).powers != "zero" and get_method(n).stateful is None)
    print(f"p = {args.power}, fp32 on CPU ({torch.get_num_threads()} threads), torch {torch.__version__}; "
          f"err / err_c: worst over {', '.join(SPECTRA)}; time: one call / NS5's")
    head = "".join(f"{k:>11}" for k in SPECTRA)
    print(f"{'shape':>10} {'method':<13}{head} {'worst err':>9} {'worst err_c':>11} {'time/NS5':>9} {'ms':>9}")
    for shape in args.shapes.split(","):
        m, n = (int(v) for v in shape.lower().split("x"))
        gen = torch.Generator().manual_seed(args.seed + m + n)
        cases = [make(kind, m, n, gen) for kind in SPECTRA]
        refs = [reference(x, args.power)[0] for *_, x in cases]
        x0 = cases[0][3]
        t_ns5 = best_time(lambda: newton_schulz5(x0), args.repeat)
        t_stream: Optional[float] = None
        for name in ["ns5"] + methods + ["stream (cold)", "stream (warm)"]:
            errs, errs_c = [], []
            for (u, s, v, x), r in zip(cases, refs):
                if name == "ns5":
                    y = newton_schulz5(x)
                elif name == "stream (cold)":
                    y = stream_power(x, args.power)[0]
                elif name == "stream (warm)":
                    y = _warm_stream(u, s, v, args.power, args.stream_steps, gen)
                    r = reference(y[1], args.power)[0]
                    y = y[0]
                else:
                    y = spectral_power(x, args.power, method=name)
                e, ec = errors(y, r)
                errs.append(e)
                errs_c.append(ec)
            if name == "ns5":
                t = t_ns5
            elif name.startswith("stream"):  # one step costs the same cold or warm
                if t_stream is None:
                    t_stream = best_time(lambda: stream_power(x0, args.power, basis=torch.eye(n)), args.repeat)
                t = t_stream
            else:
                t = best_time(lambda: spectral_power(x0, args.power, method=name), args.repeat)
            per = "".join(f"{e:11.4f}" for e in errs)
            print(f"{shape:>10} {name:<13}{per} {max(errs):9.4f} {max(errs_c):11.4f} {t / t_ns5:9.2f} {1e3 * t:9.2f}", flush=True)


def _warm_stream(u, s, v, power, steps, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs ``steps`` stream steps on a matrix rotating by ~1e-3 per step; (last y, last x)."""
    m, n = u.size(0), v.size(0)
    a = torch.randn(m, m, generator=gen, dtype=torch.float64)
    b = torch.randn(n, n, generator=gen, dtype=torch.float64)
    ru, rv = torch.linalg.matrix_exp(1e-3 * (a - a.T)), torch.linalg.matrix_exp(1e-3 * (b - b.T))
    basis, y, x = None, None, None
    for _ in range(steps):
        x = ((u * s) @ v.T).float()
        y, basis, _ = stream_power(x, power, basis=basis)
        u, v = ru @ u, rv @ v
    return y, x


if __name__ == "__main__":
    main()
