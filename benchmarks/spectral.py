"""Time and accuracy of every spectral method on LLaMA layer shapes.

    python benchmarks/spectral.py                          # CPU, fp32, shapes 60m,1b,foundation
    python benchmarks/spectral.py --device cuda --shapes 60m,1b,7b --json out.json

For each shape and method: time per matrix (best of ``--repeat`` after one warm-up), the ratio
to Muon's NS5 measured in the same run (fp32 on CPU, bf16 on CUDA: what Muon runs there), and the
accuracy against the HTMuon bar: ``err / bar`` with ``err = ||Y - R|| / ||R||``,
``bar = 0.25 * min_c ||c P - R|| / ||R||``, ``R = U Σ^p V^T`` and ``P = U V^T`` (rank cutoff
applied to both) from a float64 reference (SVD; the float64 Gram eigh where the SVD is skipped).
``err/bar <= 1`` meets the bar; NS5's own row shows how far Muon is (about 4 by construction).
The input is a Gaussian matrix (a momentum-like, well-spread spectrum) in ``--dtype``.
``gram32`` is also timed on an ill-conditioned input of the same shape (one column scaled by
1e-3), where it redoes the matrix in float64: ``time_s_fallback``.

    python benchmarks/spectral.py --device cuda --write-table   # measure, update auto's table
    python benchmarks/spectral.py --device cuda --dtype bfloat16 --powers 0.0625,0.125,0.25 --write-table

``--write-table [PATH]`` merges this device's rows into the table ``method="auto"`` reads
(default: the package's htmuon_dist/spectral/auto_table.json; other devices' entries, and this
device's entries at other shapes or powers, are kept). Each entry records its power: auto reads a
method's run at the largest measured power <= p (a method that met the bar at some p meets it at
larger ones, not smaller), and the rule where nothing was measured at or below p.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from htmuon_dist.spectral import auto_choice, auto_table, default_rtol, spectral_power  # noqa: E402
from htmuon_dist.spectral.accuracy import bar, rel_err  # noqa: E402
from htmuon_dist.spectral.exact import eigh_power, svd_power  # noqa: E402
from htmuon_dist.spectral.newton_schulz import newton_schulz5  # noqa: E402

SHAPES: dict[str, list[tuple[int, int]]] = {
    "60m": [(512, 512), (512, 1376), (1376, 512)],
    "1b": [(2048, 2048), (2048, 5461), (5461, 2048)],
    "7b": [(4096, 4096), (4096, 11008), (11008, 4096)],
    # times of svd / eigh / ns5 another issue needs (fp32 CPU)
    "foundation": [(1024, 1024), (1024, 2816), (2816, 1024)],
    # the shapes issue #7 reports: LLaMA-1B MLP (both orientations) and LLaMA-7B MLP
    "issue": [(2048, 5461), (5461, 2048), (4096, 11008)],
}
METHODS = ["svd", "eigh", "ns5", "tracked_ns", "gram_rr", "gram32", "auto"]
# fp16/bf16 product methods: in the default list on CUDA only (a CPU without AMX runs a 16-bit
# matmul ~77x slower than fp32, so there they time the CPU, not the method)
GPU_METHODS = ["polar_express", "fast_ns"]
# Muon's power-0 methods: run at p = 0 and judged after the best rescale, as NS5
POLAR = ("ns5", "polar_express")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], torch.Tensor], device: torch.device, repeat: int) -> float:
    """Best wall time of ``repeat`` calls after one warm-up, in seconds."""
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def reference(x: torch.Tensor, powers: list[float], rtol: float,
              use_svd: bool) -> tuple[dict[float, torch.Tensor], torch.Tensor]:
    """({p: R_p}, P) in float64 for a (m, n) matrix: HTMuon's update at each power and the polar
    factor."""
    xb = x.unsqueeze(0)
    wide = xb.size(-2) < xb.size(-1)
    xt = xb.mT if wide else xb
    fn = svd_power if use_svd else eigh_power

    def one(power: float) -> torch.Tensor:
        out = fn(xt, power, rtol)
        return (out.mT if wide else out)[0]

    return {power: one(power) for power in powers}, one(0.0)


def _ill_conditioned(x: torch.Tensor) -> torch.Tensor:
    """``x`` with one column (tall) or row (wide) scaled by 1e-3: lambda_min/lambda_max ~ 1e-8."""
    y = x.clone()
    if y.size(-2) >= y.size(-1):
        y[:, 0] *= 1e-3
    else:
        y[0, :] *= 1e-3
    return y


def rel_err_and_bar(y: torch.Tensor, r: torch.Tensor, p: torch.Tensor, rescale: bool) -> tuple[float, float]:
    y = y.double()
    if rescale:  # Muon's update is compared up to the best scalar, like the bar itself
        y = y * ((y * r).sum() / (y * y).sum().clamp_min(1e-300))
    return rel_err(y, r), bar(r, p)


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    powers = args.powers
    rows: list[dict] = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    chosen = args.methods or ",".join(METHODS + (GPU_METHODS if device.type == "cuda" else []))
    for group in args.shapes.split(","):
        for m, n in SHAPES[group]:
            x = torch.randn(m, n, generator=gen).to(device=device, dtype=dtype)
            rtol = default_rtol(dtype, (m, n))
            big = max(m, n) * min(m, n) ** 2 > 4096 * 4096 * 4096
            use_svd_ref = not (big and not args.svd_7b)
            refs, p = reference(x, powers, rtol, use_svd_ref)
            methods = ["svd", "eigh", "ns5"] if group == "foundation" else chosen.split(",")
            if "ns5" not in methods:
                methods = ["ns5"] + methods  # every ratio is to NS5 timed in the same run
            muon: dict[str, tuple[float, torch.Tensor]] = {}  # power-0 runs: timed once per shape
            for power in powers:
                r = refs[power]
                first = len(rows)
                for name in methods:
                    if name == "svd" and big and not args.svd_7b:
                        continue
                    row = _measure(name, x, power, r, p, args.repeat, muon)
                    rows.append(dict(row, shape=[m, n], group=group, reference="svd" if use_svd_ref else "eigh"))
                times = {row["method"]: row["time_s"] for row in rows[first:]}
                for row in rows[first:]:
                    if "ns5" in times:
                        row["ratio_to_ns5"] = row["time_s"] / times["ns5"]
                _print_rows(rows[first:], m, n, power)
                if args.json:  # after every shape, so a run cut short still leaves its rows
                    _write_json(args, rows)
    return rows


def _measure(name: str, x: torch.Tensor, power: float, r: torch.Tensor, p: torch.Tensor, repeat: int,
             muon: dict[str, tuple[float, torch.Tensor]]) -> dict:
    """One method on x: its time (best of ``repeat``) and err/bar against ``r`` (HTMuon at
    ``power``) and ``p`` (the polar factor). Muon's methods run at power 0, compared after the
    best rescale; their (time, output) is kept in ``muon`` and reused at the shape's other powers."""
    device = x.device
    if name == "ns5":
        fn = lambda: newton_schulz5(x)  # noqa: E731  (bf16 on CUDA, fp32 on CPU)
    elif name in POLAR:
        fn = lambda: spectral_power(x, 0.0, method=name)  # noqa: E731
    else:
        fn = lambda: spectral_power(x, power, method=name)  # noqa: E731
    ran_at = 0.0 if name in POLAR else power
    if ran_at == 0.0 and name in muon:
        t, y = muon[name]
    else:
        t, y = best_time(fn, device, repeat), fn()
        if ran_at == 0.0:
            muon[name] = (t, y)
    err, bar = rel_err_and_bar(y, r, p, rescale=(ran_at == 0.0))
    m, n = x.shape
    row = {"method": name, "power": power, "time_s": t, "err": err, "bar": bar, "err_over_bar": err / bar,
           "resolved": auto_choice(device.type, max(m, n), min(m, n), power=ran_at) if name == "auto" else name}
    if name == "gram32":
        row["time_s_fallback"] = best_time(
            lambda: spectral_power(_ill_conditioned(x), power, method=name), device, repeat)
    return row


def _powers(text: Optional[str], default: float) -> list[float]:
    """--powers as floats (--power where it is not given); each must be in [0, 1]."""
    if text is None:
        return [default]
    try:
        powers = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--powers must be a comma list of numbers in [0, 1], got {text!r}") from None
    if not powers or any(not 0.0 <= p <= 1.0 for p in powers):
        raise ValueError(f"--powers must be a comma list of numbers in [0, 1], got {text!r}")
    return sorted(set(powers))


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _write_json(args: argparse.Namespace, rows: list[dict]) -> None:
    Path(args.json).write_text(json.dumps({"device": _device_name(torch.device(args.device)),
                                           "torch": torch.__version__, "args": vars(args),
                                           "rows": rows}, indent=1))


def _print_rows(rows: list[dict], m: int, n: int, power: float) -> None:
    """One shape's rows at one power (the ``p`` column: the power the row's method ran at)."""
    for row in rows:
        name = row["method"] + (f" ({row['resolved']})" if row["method"] == "auto" else "")
        ran_at = 0.0 if row["method"] in POLAR else power
        print(
            f"{m:>6}x{n:<6} {ran_at:>6g} {name:<16} {row['time_s'] * 1e3:>10.2f} ms "
            f"{row.get('ratio_to_ns5', float('nan')):>7.2f}x ns5   "
            f"err {row['err']:.2e}  err/bar {row['err_over_bar']:.2e}"
            + (f"  ill-conditioned {row['time_s_fallback'] * 1e3:.2f} ms" if "time_s_fallback" in row else ""),
            flush=True,
        )


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", help="input dtype (float32, bfloat16)")
    ap.add_argument("--shapes", default=None,
                    help="comma list of 60m,1b,7b,issue,foundation (default CPU: 60m,1b,foundation; "
                         "CUDA: 60m,1b,7b)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--methods", default=None,
                    help=f"comma list of methods to time (default {','.join(METHODS)}, and on CUDA also "
                         f"{','.join(GPU_METHODS)}; ns5 always runs)")
    ap.add_argument("--power", type=float, default=0.125, help="HTMuon's p (default 0.125)")
    ap.add_argument("--powers", default=None,
                    help="comma list of powers to measure each shape at (overrides --power), e.g. "
                         "0.0625,0.125,0.25; --write-table records each run's power, and auto reads "
                         "a method's run at the largest measured power <= p")
    ap.add_argument("--svd-7b", action="store_true", help="also time svd (and use it as the reference) on 7B shapes")
    ap.add_argument("--json", default=None, help="write all rows to this file")
    ap.add_argument("--write-table", nargs="?", const=str(auto_table.TABLE_PATH), default=None,
                    metavar="PATH", help="merge this device's measurements into auto's table "
                    f"(default path {auto_table.TABLE_PATH.relative_to(Path(__file__).resolve().parents[1])})")
    ap.add_argument("--table-from", default=None, metavar="JSON",
                    help="with --write-table: take the rows from a saved --json file of this "
                    "script instead of measuring (its device must be this one)")
    ap.add_argument("--allow-cpu", action="store_true", help="--device cuda without a GPU runs on the CPU")
    args = ap.parse_args(argv)
    try:
        args.powers = _powers(args.powers, args.power)
    except ValueError as e:
        ap.error(str(e))
    if args.shapes is None:
        args.shapes = "60m,1b,7b" if args.device.startswith("cuda") else "60m,1b,foundation"
    from htmuon_dist.training.preflight import NoGPUError, require_cuda

    try:
        args.device = require_cuda(args.device, args.allow_cpu)
    except NoGPUError as e:
        raise SystemExit(f"spectral.py: error: {e}") from None
    dev = torch.device(args.device)
    name = _device_name(dev)
    print(f"device {name}, torch {torch.__version__}, input {args.dtype}, "
          f"p = {', '.join(f'{p:g}' for p in args.powers)}, "
          f"threads {torch.get_num_threads()}, best of {args.repeat}", flush=True)
    print(f"{'shape':>13} {'p':>6} {'method':<16} {'time/matrix':>13} {'ratio':>8}", flush=True)
    if args.table_from:
        saved = json.loads(Path(args.table_from).read_text())
        if saved.get("device") != name:
            raise SystemExit(f"spectral.py: error: --table-from {args.table_from} was measured on "
                             f"{saved.get('device')!r}, this is {name!r}")
        rows = [{"power": saved["args"].get("power", auto_table.LEGACY_POWER), **row} for row in saved["rows"]]
        args.shapes = f"{saved['args']['shapes']} (from {args.table_from})"
        args.repeat = saved["args"].get("repeat", args.repeat)
        args.dtype = saved["args"].get("dtype", args.dtype)
        args.powers = sorted({float(r["power"]) for r in rows})
    else:
        rows = run(args)
    if args.write_table:
        path = Path(args.write_table)
        key = auto_table.device_key(dev.type, dev.index)
        source = (f"benchmarks/spectral.py --device {args.device} --dtype {args.dtype} --shapes {args.shapes} "
                  f"--powers {','.join(f'{p:g}' for p in args.powers)} --repeat {args.repeat}")
        table = auto_table.merge_measurements(auto_table.load_table(path), key, rows, source)
        path.write_text(json.dumps(table, indent=1) + "\n")
        print(f"wrote {len(table['devices'][key]['entries'])} entries (shape, power) for {key!r} to {path}")
        auto_table._load.cache_clear()
        for m, n in sorted({(max(r["shape"]), min(r["shape"])) for r in rows}):
            for power in sorted({r["power"] for r in rows}):
                print(f"  auto at {m}x{n}, p = {power:g}: {auto_table.choose(key, m, n, table, power=power)}")


if __name__ == "__main__":
    main()
