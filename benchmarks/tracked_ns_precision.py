"""How many mantissa bits ``tracked_ns`` needs: its accuracy when every matmul rounds its operands.

    python benchmarks/tracked_ns_precision.py                 # CPU, about a minute
    python benchmarks/tracked_ns_precision.py --shape 768,512 --power 0.125

GPUs run matmuls faster with shorter mantissas (TF32 and fp16: 10 bits, bf16: 7) than in fp32
(23). This script measures, on a CPU, what that rounding does to ``tracked_ns``. Every product
rounds its two operands to ``bits`` mantissa bits (round to nearest, exponent range kept, as
TF32 does) and accumulates in fp32. It prints ``err/bar`` for each test spectrum of
:mod:`htmuon_dist.spectral.accuracy` (<= 1 meets the HTMuon bar). It measures accuracy only; the
speed of those formats is a GPU question.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from htmuon_dist.spectral import default_rtol  # noqa: E402
from htmuon_dist.spectral.accuracy import SPECTRA, bar, make_matrix, reference, rel_err  # noqa: E402
from htmuon_dist.spectral.tracked_ns import tracked_ns_power  # noqa: E402

FORMATS = {"fp32": 23, "tf32/fp16 (10 bits)": 10, "bf16 (7 bits)": 7}


def round_mantissa(x: torch.Tensor, bits: int) -> torch.Tensor:
    """float32 ``x`` rounded to nearest with ``bits`` explicit mantissa bits (exponent kept)."""
    drop = 23 - bits
    if drop <= 0:
        return x
    as_int = x.contiguous().view(torch.int32)
    as_int = (as_int + (1 << (drop - 1))) & ~((1 << drop) - 1)
    return as_int.view(torch.float32)


def rounded_matmul(a: torch.Tensor, b: torch.Tensor, bits: int) -> torch.Tensor:
    return round_mantissa(a, bits) @ round_mantissa(b, bits)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="768,512", help="m,n of the test matrices")
    ap.add_argument("--power", type=float, default=0.125)
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args(argv)
    m, n = (int(v) for v in args.shape.split(","))
    wide = m < n
    print(f"tracked_ns, {m}x{n}, p = {args.power}, torch {torch.__version__}; err/bar per spectrum")
    print(f"{'operand format':<22}" + "".join(f"{k:>12}" for k in SPECTRA) + f"{'worst':>9}")
    for label, bits in FORMATS.items():
        mm = functools.partial(rounded_matmul, bits=bits)
        ratios = []
        for kind in SPECTRA:
            mat = make_matrix(kind, m, n, 1.0, seed=args.seed)
            r, p = reference(mat, args.power)
            x = (mat.mT if wide else mat).unsqueeze(0)
            y = tracked_ns_power(x, args.power, default_rtol(mat.dtype, mat.shape), mm=mm)[0]
            ratios.append(rel_err(y.mT if wide else y, r) / bar(r, p))
        print(f"{label:<22}" + "".join(f"{v:>12.3f}" for v in ratios) + f"{max(ratios):>9.3f}", flush=True)


if __name__ == "__main__":
    main()
