"""Times the ESD statistics of one matrix (what an owner does per matrix under --esd_steps):
the float64 Gram + eigvalsh part and the Clauset-Shalizi-Newman KS scan, per shape.

    python benchmarks/esd_cost.py [--shapes 128x128,512x512,1376x512,2048x2048,5461x2048] [--device cpu] [--repeat 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from htmuon_dist.diagnostics import eigenvalues, fit_power_law  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="128x128,352x128,512x512,1376x512,2048x2048,5461x2048")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=2, help="best of N timings")
    args = p.parse_args()
    device = torch.device(args.device)
    print(f"device {device}, torch threads {torch.get_num_threads()}")
    print(f"{'shape':>12} {'eigvalsh (s)':>13} {'KS fit (s)':>11} {'total (s)':>10}")
    for spec in args.shapes.split(","):
        m, n = (int(v) for v in spec.lower().split("x"))
        W = torch.randn(m, n, device=device) / n ** 0.5
        best_e = best_f = float("inf")
        for _ in range(args.repeat):
            _sync(device)
            t0 = time.perf_counter()
            lam = eigenvalues(W)
            _sync(device)
            t1 = time.perf_counter()
            fit_power_law(lam[lam > 0])
            _sync(device)
            t2 = time.perf_counter()
            best_e, best_f = min(best_e, t1 - t0), min(best_f, t2 - t1)
        print(f"{spec:>12} {best_e:>13.4f} {best_f:>11.4f} {best_e + best_f:>10.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
