"""Machine-independent cost of every spectral method: products counted by dtype, priced at H100 rates.

    python benchmarks/gpu_cost.py                         # all registered methods x the five shapes
    python benchmarks/gpu_cost.py --out benchmarks/results/gpu_cost_priced.txt
    python benchmarks/gpu_cost.py --methods fast_ns,ns5 --shapes 2048x5461 --breakdown

What it does, per method and (m, n) shape:

1. **count**: :class:`CostCounter`, a ``TorchDispatchMode``, sees every aten op the method runs and
   records (a) each matrix product's multiply-adds by operand dtype (``mm``, ``bmm``, ``addmm``,
   ``baddbmm``, ``addbmm``, ``mv``, ``dot``, ``_scaled_mm``; ``matmul`` arrives as one of those)
   and (b) each decomposition with its shape and dtype (``eigh``, ``svd``, ``geqrf``, QR,
   ``householder_product``, Cholesky, LU, solves, inverses). The method runs on **meta** tensors
   of full size where it can (nothing is computed; ``precision.mm`` and bf16 NS5 show their real
   operand dtype there). A method that reads a tensor value on the host (``gram32``: which
   matrices fall back to float64) or uses an op without a meta kernel (``stream``: ``geqrf``)
   runs on the **CPU at a reduced size** (smaller side ``--cpu-n``, default 128) and every
   product/decomposition dimension equal to the reduced m or n is mapped back to the full one,
   which is exact for methods whose step count does not depend on the size. The table says
   which way each method was counted.
2. **price** (every figure is *priced*, never measured): matrix products at
   ``2 x multiply-adds / rate(dtype)``, decompositions from the measured eigh/svd times, all from
   the H100 probe in ``benchmarks/results/spectral_h100.md``:

   * bf16/fp16 (and fp8): the rate bf16 NS5 reached there, ``5 (4 m n^2 + 2 n^3) / t_NS5``, at
     the same shape (128-142 TFLOP/s at the 1B MLP shapes, 598-633 at 7B); (2048, 2048), not
     measured, takes the rate of the measured shape with the nearest aspect ratio, (4096, 4096);
   * fp32: 50 TFLOP/s (measured 48-51, IEEE, no TF32); fp64: 50 TFLOP/s (assumed, as
     ``benchmarks/step_model.py``; H100 SXM fp64 tensor-core peak 67);
   * ``eigh``: the measured time at the nearest measured n (512..4096; fp32 or fp64 by the
     input's dtype), scaled by ``n^3``; ``svd``: the measured fp32 2048 svd (229 ms) scaled by
     ``m n^2`` (fp64 x the eigh64/eigh32 ratio); any other decomposition: its LAPACK FLOP count
     at the rate the measured eigh reached (``9 n^3 / t_eigh``).
   Elementwise work and norms are not priced (O(mn) memory passes; NS5's calibration absorbs its
   own); so a priced figure is a lower bound for methods with more elementwise passes than NS5.

:func:`price` and :func:`count` are the importable interface (``benchmarks/step_model.py`` uses
:func:`price`, so the step model and this table agree).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = [(2048, 5461), (5461, 2048), (2048, 2048), (4096, 11008), (4096, 4096)]

# --- the H100 probe (benchmarks/results/spectral_h100.md), measured ------------------------------
NS5_MS = {(2048, 5461): 4.246, (5461, 2048): 3.835, (4096, 11008): 6.919, (4096, 4096): 3.446}
EIGH_MS = {  # dtype -> n -> ms (torch.linalg.eigh of an n x n SPD matrix)
    torch.float32: {512: 14.88, 1024: 11.35, 2048: 26.13, 4096: 96.8},
    torch.float64: {512: 5.07, 1024: 11.49, 2048: 27.9, 4096: 126.9},
}
SVD32_MS_2048 = 229.2  # torch.linalg.svd(2048 x 2048 fp32, full_matrices=False)
FP32_RATE = 50e12  # measured 48.4-50.7 TFLOP/s (IEEE fp32 matmul)
FP64_RATE = 50e12  # assumed (not measured): step_model.py's figure
EIGH_FLOPS_PER_N3 = 9.0  # the registry's eigh model: ~9 n^3 for eigenvalues and vectors
LOW_PRECISION = (torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2)

_PRODUCTS = {"mm", "bmm", "addmm", "baddbmm", "addbmm", "mv", "addmv", "dot", "vdot", "_scaled_mm",
             "_int_mm"}
# op name -> decomposition kind (LAPACK-level ops after CompositeImplicit decomposition)
_DECOMPOSITIONS = {
    "_linalg_eigh": "eigh", "linalg_eigh": "eigh", "_linalg_svd": "svd", "linalg_svd": "svd",
    "geqrf": "qr", "linalg_qr": "qr", "linalg_householder_product": "householder",
    "householder_product": "householder", "orgqr": "householder",
    "ormqr": "householder", "linalg_cholesky_ex": "cholesky", "cholesky": "cholesky",
    "linalg_lu_factor_ex": "lu", "linalg_lu": "lu", "_linalg_solve_ex": "solve",
    "linalg_solve_triangular": "triangular_solve", "triangular_solve": "triangular_solve",
    "linalg_inv_ex": "inv", "_linalg_eigvals": "eigh", "linalg_eig": "eig", "_linalg_slogdet": "lu",
    "lstsq": "lstsq", "linalg_lstsq": "lstsq",
}


# How an unmeasured shape ((2048, 2048)) gets its bf16 rate: "aspect" = the measured shape with
# the nearest aspect ratio ((4096, 4096): 598 TFLOP/s, close to the probe's 602 for one 2048^2
# bf16 mm); "side" = the slower measured shape with the same smaller side ((5461, 2048): 128
# TFLOP/s, the rate the table used there). See --unmeasured-rate.
UNMEASURED_RATE = "aspect"


def ns5_rate_at(m: int, n: int) -> float:
    """FLOP/s bf16 NS5 reached on the H100 at (m, n); unmeasured shapes follow UNMEASURED_RATE."""
    from htmuon_dist.spectral.newton_schulz import ns5_cost

    def rate(shape: tuple[int, int]) -> float:
        a, b = max(shape), min(shape)
        return ns5_cost(a, b) / (NS5_MS[shape] * 1e-3)

    if (m, n) in NS5_MS:
        return rate((m, n))
    if UNMEASURED_RATE == "side":
        same = [s for s in NS5_MS if min(s) == min(m, n)]
        if same:
            return min(rate(s) for s in same)
    aspect = math.log(max(m, n) / min(m, n))
    best = min(NS5_MS, key=lambda s: (abs(math.log(max(s) / min(s)) - aspect), abs(math.log(min(s) / min(m, n)))))
    return rate(best)


# --- counting ------------------------------------------------------------------------------------

@dataclass
class Counts:
    """What one call ran: multiply-adds per operand dtype and the decompositions.

    ``macs``: dtype -> multiply-adds (a product (b, i, k) @ (b, k, j) adds b·i·k·j).
    ``decompositions``: (kind, op name, dtype, shape of the decomposed operand) per call.
    ``where``: "meta (full size)" or "cpu at (m', n'), scaled" (how it was counted).
    """

    macs: dict[torch.dtype, float] = field(default_factory=lambda: defaultdict(float))
    decompositions: list[tuple[str, str, torch.dtype, tuple[int, ...]]] = field(default_factory=list)
    where: str = ""

    def flops(self, dtype: Optional[torch.dtype] = None) -> float:
        """2 x multiply-adds (of ``dtype``, or of all dtypes)."""
        if dtype is None:
            return 2.0 * sum(self.macs.values())
        return 2.0 * self.macs.get(dtype, 0.0)


def _tensor_args(args, kwargs) -> list[torch.Tensor]:
    out = []
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(t for t in a if isinstance(t, torch.Tensor))
    return out


class CostCounter(TorchDispatchMode):
    """Counts products (multiply-adds by operand dtype) and decompositions of every aten op run
    inside it on ``device`` (host-side work on other devices, e.g. a schedule fitted on the CPU in
    float64, is ignored; ``device=None`` counts everything). ``dim_map`` maps a dimension size to
    the one it stands for (reduced-size runs)."""

    def __init__(self, device: Optional[str] = None, dim_map: Optional[dict[int, int]] = None):
        super().__init__()
        self.device = device
        self.dim_map = dim_map or {}
        self.counts = Counts()

    def _d(self, size: int) -> int:
        return self.dim_map.get(int(size), int(size))

    def _numel(self, shape) -> float:
        return float(math.prod(self._d(s) for s in shape))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__.removesuffix("_")  # in-place forms (baddbmm_) too
        if name not in _PRODUCTS and name not in _DECOMPOSITIONS:
            return out
        tensors = _tensor_args(args, kwargs)
        if self.device is not None and not any(t.device.type == self.device for t in tensors):
            return out
        if name in _PRODUCTS:
            self._product(name, args)
        else:
            a = tensors[0]
            shape = tuple(self._d(s) for s in a.shape)
            self.counts.decompositions.append((_DECOMPOSITIONS[name], name, a.dtype, shape))
        return out

    def _product(self, name: str, args) -> None:
        if name in ("mm", "_scaled_mm", "_int_mm"):
            a, b = args[0], args[1]
            macs = self._numel(a.shape) * self._d(b.shape[-1])
        elif name == "bmm":
            a, b = args[0], args[1]
            macs = self._numel(a.shape) * self._d(b.shape[-1])
        elif name in ("addmm", "baddbmm", "addbmm"):
            a, b = args[1], args[2]
            macs = self._numel(a.shape) * self._d(b.shape[-1])
        elif name in ("mv", "dot", "vdot"):
            a = args[0]
            macs = self._numel(a.shape)
        else:  # addmv(self, mat, vec)
            a = args[1]
            macs = self._numel(a.shape)
        self.counts.macs[a.dtype] += macs


# --- running a method ----------------------------------------------------------------------------

# dtype of the matrix a method is handed: bf16 (momentum that travelled in bf16, the engine's
# comm_dtype=torch.bfloat16; the rank cutoff follows bf16's noise) or float32 (a float32 wire).
# Methods whose step count follows the cutoff (tracked_ns, fast_ns) cost less on bf16 input.
INPUT_DTYPE = torch.bfloat16


def method_call(name: str, power: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """The call that computes method ``name`` the way a GPU would run it. ``ns5``'s registered form
    picks bf16 only for CUDA tensors, so it is called with ``dtype=torch.bfloat16`` here (what
    Muon runs on a GPU); ``auto`` is priced as the method it names on CUDA at ``power``."""
    from htmuon_dist.spectral import auto_choice, newton_schulz5, spectral_power

    if name == "ns5":
        return lambda x: newton_schulz5(x, dtype=torch.bfloat16)

    def call(x: torch.Tensor) -> torch.Tensor:
        resolved = auto_choice("cuda", x.size(-2), x.size(-1), power=power) if name == "auto" else name
        return spectral_power(x, power, method=resolved)

    return call


def _needs_cpu(fn: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype) -> Optional[str]:
    """None when ``fn`` runs on a small meta tensor, else why not."""
    try:
        fn(torch.empty(48, 32, device="meta", dtype=dtype))
        return None
    except (RuntimeError, NotImplementedError) as e:  # .item() on meta, or no meta kernel
        return str(e).splitlines()[0][:80]


ILL = ":ill"  # suffix of a method name: count it on an ill-conditioned input (gram32's fallback)


def cpu_input(m: int, n: int, seed: int = 0, kappa: float = 0.5) -> torch.Tensor:
    """A well-conditioned (m, n) float32 matrix (singular values linear from 1 down to ``kappa``):
    a momentum-like input that keeps data-dependent methods (gram32) on their fast path."""
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    s = torch.linspace(1.0, kappa, k, dtype=torch.float64)
    return ((u * s) @ v.T).to(torch.float32)


def count(name: str, m: int, n: int, power: float = 0.125, cpu_n: int = 128,
          cpu_kappa: float = 0.5, input_dtype: Optional[torch.dtype] = None) -> Counts:
    """Counts method ``name`` on one (m, n) matrix (meta at full size where it runs there, else
    the CPU at smaller side ``cpu_n`` with dimensions mapped back; ``cpu_kappa``: the CPU input's
    sigma_min / sigma_max; ``input_dtype``: the matrix's dtype, default :data:`INPUT_DTYPE`).
    ``power`` is forced to 0 for methods that only orthogonalise."""
    dtype = INPUT_DTYPE if input_dtype is None else input_dtype
    from htmuon_dist.spectral import get_method

    if name.endswith(ILL):  # the data-dependent slow path: an ill-conditioned CPU input
        name, cpu_kappa = name[: -len(ILL)], 1e-4
    if get_method(name).powers == "zero":
        power = 0.0
    fn = method_call(name, power)
    why = _needs_cpu(fn, dtype)
    if why is None:
        x = torch.empty(m, n, device="meta", dtype=dtype)
        fn(x)  # warm-up: host-side schedules (lru-cached, float64 on the CPU) stay out of the count
        with CostCounter(device="meta") as counter:
            fn(x)
        counter.counts.where = "meta (full size)"
        return counter.counts
    scale = min(m, n) / cpu_n
    ms, ns = max(2, round(m / scale)), max(2, round(n / scale))
    where = f"cpu at {ms}x{ns}"
    dim_map = {ms: m, ns: n}
    if len(dim_map) < (2 if ms != ns else 1) or (ms == ns and m != n):
        raise ValueError(f"gpu_cost: reduced shape ({ms}, {ns}) of ({m}, {n}) is ambiguous; change --cpu-n")
    x = cpu_input(ms, ns, kappa=cpu_kappa).to(dtype)
    fn(x)
    with CostCounter(device="cpu", dim_map=dim_map) as counter:
        fn(x)
    counter.counts.where = f"{where}, scaled ({why})"
    return counter.counts


# --- pricing -------------------------------------------------------------------------------------

def eigh_seconds(dtype: torch.dtype, n: int) -> float:
    """Measured H100 eigh at the nearest measured n, scaled by n^3 (float64 for float64 input)."""
    table = EIGH_MS[torch.float64 if dtype == torch.float64 else torch.float32]
    n0 = min(table, key=lambda k: (abs(math.log(k / n)), -k))
    return table[n0] * 1e-3 * (n / n0) ** 3


def decomposition_seconds(kind: str, dtype: torch.dtype, shape: tuple[int, ...]) -> float:
    """Priced seconds of one decomposition of an operand of ``shape`` (..., r, c)."""
    batch = float(math.prod(shape[:-2])) if len(shape) > 2 else 1.0
    r, c = shape[-2], shape[-1]
    big, small = max(r, c), min(r, c)
    if kind == "eigh":
        return batch * eigh_seconds(dtype, c)
    if kind == "svd":
        t = SVD32_MS_2048 * 1e-3 * big * small * small / 2048**3
        if dtype == torch.float64:
            t *= eigh_seconds(torch.float64, small) / eigh_seconds(torch.float32, small)
        return batch * t
    flops = {  # LAPACK counts
        "qr": 2.0 * big * small**2 - 2.0 * small**3 / 3.0,
        "householder": 2.0 * big * small**2 - 2.0 * small**3 / 3.0,
        "cholesky": small**3 / 3.0,
        "lu": 2.0 * small**3 / 3.0,
        "solve": 2.0 * small**3 / 3.0 + 2.0 * small**2 * big,
        "triangular_solve": float(r) * r * c,
        "inv": 2.0 * small**3,
        "eig": 25.0 * small**3,
        "lstsq": 2.0 * big * small**2,
    }[kind]
    rate = EIGH_FLOPS_PER_N3 * small**3 / eigh_seconds(dtype, small)
    return batch * flops / rate


def matmul_rate(dtype: torch.dtype, m: int, n: int) -> float:
    """Priced FLOP/s of a product with ``dtype`` operands inside a method run on (m, n)."""
    if dtype in LOW_PRECISION:
        return ns5_rate_at(m, n)
    if dtype == torch.float64:
        return FP64_RATE
    return FP32_RATE


@dataclass
class Priced:
    """Priced seconds of one method at one shape, split into products and decompositions."""

    method: str
    shape: tuple[int, int]
    products_s: dict[str, float]
    decompositions_s: float
    counts: Counts

    @property
    def seconds(self) -> float:
        return sum(self.products_s.values()) + self.decompositions_s


def price_counts(counts: Counts, m: int, n: int, method: str = "") -> Priced:
    prod = {str(dt).replace("torch.", ""): 2.0 * macs / matmul_rate(dt, m, n)
            for dt, macs in counts.macs.items() if macs}
    dec = sum(decomposition_seconds(k, dt, shape) for k, _, dt, shape in counts.decompositions)
    return Priced(method, (m, n), prod, dec, counts)


@lru_cache(maxsize=512)
def _priced(method: str, m: int, n: int, power: float, rule: str, dtype: torch.dtype) -> Priced:
    return price_counts(count(method, m, n, power, input_dtype=dtype), m, n, method)


def priced(method: str, m: int, n: int, power: float = 0.125, input_dtype: Optional[torch.dtype] = None) -> Priced:
    """Counted and priced ``method`` at (m, n) (cached; the CPU-counted methods take seconds).
    ``method`` may end in ``:ill`` (counted on an ill-conditioned input); ``input_dtype``: the
    matrix's dtype (default :data:`INPUT_DTYPE`, bf16)."""
    dtype = INPUT_DTYPE if input_dtype is None else input_dtype
    return _priced(method, m, n, float(power), UNMEASURED_RATE, dtype)


def price(method: str, m: int, n: int, power: float = 0.125, input_dtype: Optional[torch.dtype] = None) -> float:
    """Priced H100 seconds of ``method`` on one (m, n) matrix of ``input_dtype`` (default bf16
    momentum; ``"ns5"``: bf16 NS5). Priced from counted products and decompositions, see the
    module docstring; not a measurement."""
    return priced(method, m, n, power, input_dtype).seconds


# --- the table -----------------------------------------------------------------------------------

def _shape(text: str) -> tuple[int, int]:
    try:
        a, b = text.lower().split("x")
        return int(a), int(b)
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must be MxN (e.g. 2048x5461), got {text!r}") from None


def table(methods: list[str], shapes: list[tuple[int, int]], power: float, breakdown: bool) -> list[str]:
    from htmuon_dist.spectral import auto_choice, get_method

    lines = [f"Priced on H100 rates (NOT measured): each method's products counted by operand dtype and its "
             f"decompositions, priced as in benchmarks/gpu_cost.py's docstring; power {power:g} "
             f"(0 for Muon-only methods); input {str(INPUT_DTYPE).replace('torch.', '')} (its noise cutoff). "
             f"Cells: priced ms per matrix and x bf16 NS5 priced at the same shape.",
             f"rates: bf16/fp16 = bf16 NS5's measured rate at the shape "
             + ", ".join(f"{m}x{n} {ns5_rate_at(m, n) / 1e12:.0f}" for m, n in shapes)
             + f" TFLOP/s; fp32 {FP32_RATE / 1e12:.0f}, fp64 {FP64_RATE / 1e12:.0f} TFLOP/s; eigh/svd from measured times", ""]
    head = f"{'method':<18} {'counted on':<34} " + " ".join(f"{f'{m}x{n}':>19}" for m, n in shapes) + f" {'worst':>8}"
    lines += [head, "-" * len(head)]
    ref = {s: price("ns5", *s, power) for s in shapes}
    for name in methods:
        spec = get_method(name.removesuffix(ILL))
        label = name
        if name == "auto":
            label = "auto->" + "/".join(sorted({auto_choice("cuda", m, n, power=power) for m, n in shapes}))
        try:
            rows = [priced(name, m, n, power) for m, n in shapes]
        except Exception as e:  # noqa: BLE001 - one method failing must not hide the others
            lines.append(f"{label:<18} not counted: {type(e).__name__}: {str(e)[:90]}")
            continue
        where = rows[0].counts.where.split(", scaled")[0] if rows[0].counts.where.startswith("cpu") else "meta"
        ratios = [r.seconds / ref[r.shape] for r in rows]
        cells = [f"{r.seconds * 1e3:8.2f} ms {q:6.2f}x" for r, q in zip(rows, ratios)]
        lines.append(f"{label:<18} {where:<34} " + " ".join(f"{c:>19}" for c in cells) + f" {max(ratios):7.2f}x"
                     + ("" if spec.powers != "zero" else "  (p = 0)"))
        if breakdown:
            for r in rows:
                parts = ", ".join(f"{k} {2 * r.counts.macs[getattr(torch, k)] / 1e9:.0f} GFLOP {v * 1e3:.2f} ms"
                                  for k, v in r.products_s.items())
                decs = defaultdict(int)
                for kind, _, dt, shape in r.counts.decompositions:
                    decs[f"{kind} {str(dt).replace('torch.', '')} {'x'.join(map(str, shape))}"] += 1
                dec = "; ".join(f"{c} x {k}" for k, c in decs.items())
                lines.append(f"    {r.shape[0]}x{r.shape[1]}: {parts or 'no products'}"
                             + (f"; decompositions {r.decompositions_s * 1e3:.2f} ms ({dec})" if dec else ""))
    lines += ["", "counted on: meta = full-size meta tensors (no compute); cpu at m'xn' = run on the CPU at "
              "that reduced size (the method reads a tensor value on the host or lacks a meta kernel), every "
              "dimension mapped back to (m, n). gram32 is priced on a well-conditioned input (sigma in [0.5, 1]: "
              "its fast path), gram32:ill on sigma in [1e-4, 1] (every matrix redone by the float64 eigh)."]
    return lines


def markdown(methods: list[str], shapes: list[tuple[int, int]], power: float) -> list[str]:
    """The table as Markdown: priced x bf16 NS5 per method and shape, and the worst."""
    from htmuon_dist.spectral import auto_choice

    out = ["| method (priced, not measured) | " + " | ".join(f"{m}×{n}" for m, n in shapes) + " | worst |",
           "|---|" + "---|" * (len(shapes) + 1)]
    for name in methods:
        label = name if name != "auto" else "auto → " + "/".join(sorted({auto_choice("cuda", m, n, power=power) for m, n in shapes}))
        ratios = [price(name, m, n, power) / price("ns5", m, n, power) for m, n in shapes]
        out.append(f"| `{label}` | " + " | ".join(f"{q:.2f}×" for q in ratios) + f" | {max(ratios):.2f}× |")
    return out


def main(argv: Optional[list[str]] = None) -> None:
    from htmuon_dist.spectral import available_methods

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=None, help="comma list (default: every registered method)")
    ap.add_argument("--shapes", type=_shape, nargs="+", default=SHAPES, help="MxN shapes")
    ap.add_argument("--power", type=float, default=0.125)
    ap.add_argument("--breakdown", action="store_true", help="also print GFLOP by dtype and the decompositions")
    ap.add_argument("--unmeasured-rate", choices=["aspect", "side"], default="aspect",
                    help="bf16 rate of a shape the probe did not measure (2048x2048): that of the measured shape "
                         "with the nearest aspect ratio (default) or the slower one with the same smaller side")
    ap.add_argument("--input-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                    help="dtype of the matrix each method is handed: bfloat16 (momentum over a bf16 wire, default) "
                         "or float32; the default rank cutoff follows it")
    ap.add_argument("--markdown", action="store_true", help="also print the ratios as a Markdown table")
    ap.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = ap.parse_args(argv)
    global UNMEASURED_RATE, INPUT_DTYPE
    UNMEASURED_RATE = args.unmeasured_rate
    INPUT_DTYPE = getattr(torch, args.input_dtype)
    names = args.methods.split(",") if args.methods else list(available_methods())
    if args.methods is None and "gram32" in names:
        names.insert(names.index("gram32") + 1, "gram32" + ILL)
    lines = table(names, args.shapes, args.power, args.breakdown)
    if args.markdown:
        lines += [""] + markdown([n for n in names if n != "ns5"] + ["ns5"], args.shapes, args.power)
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        cmd = "python benchmarks/gpu_cost.py " + " ".join(argv if argv is not None else sys.argv[1:])
        args.out.write_text(f"$ {cmd}\n" + text)


if __name__ == "__main__":
    main()
