"""Predicted optimizer step vs forward+backward for LLaMA-1B/7B at W = 8..1024 ranks.

    python benchmarks/step_model.py                         # H100 probe times (committed), default
    python benchmarks/step_model.py --profile cpu           # measure per-method times here, scale, predict
    python benchmarks/step_model.py --gpu-report R.json     # a GPU run of spectral.py --json / gpu_acceptance

What it models, per rank and optimizer step (all inputs printed with the table):

* forward+backward: ``(6 N + 12 L d s) · tokens_per_rank / (peak · MFU)`` (N parameters, L
  layers, d hidden, s sequence length; weak scaling: every rank keeps its tokens as W grows,
  or ``--global-tokens`` fixes the global batch so that ranks get ``global/W``).
* Σ^p: every hidden matrix (q, k, v, o, gate, up, down per layer; the Muon convention) is owned
  by one rank; owners are assigned largest-first to the least-loaded rank (what the planner does
  with FLOP costs), and the step waits for the most loaded owner. A matrix is never split, so
  past W = #matrices the floor is the slowest single matrix. Per-matrix times come from the
  profile: measured at that shape when it was, else the method's largest measured size of the
  nearest aspect ratio scaled by its FLOP cost (``--profile cpu`` measures small sizes here), else
  priced by ``benchmarks/gpu_cost.py`` (the h100-probe profile and GPU reports: products counted
  by dtype, decompositions at the measured eigh times; the same figures as its table), else
  composed from the profile's eigh times and matmul rates.
* exchange: each rank sends its shard of every matrix to the owner and receives its shard of
  the update: ``2 · max(P/W, largest matrix) · bytes`` over ``--intra-gbps`` (W <= 8, NVLink)
  or ``--inter-gbps`` (W > 8, per-GPU network).
* elementwise: momentum, Nesterov, weight decay and the update on P/W values: ~10 fp32 passes at
  ``--hbm-tbps``.
* ``htmuon_interval``: one exact step and k-1 NS5 steps in every k (k = 5): the average.

Σ^p runs serially on each owner here; concurrent streams (spectral/grouped.py) would lower it on
a GPU by an amount not measured yet. The output is a prediction, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/spectral.py

MODELS = {  # hidden, layers, ffn, vocab (configs/model/{1b,7b}.json)
    "1b": dict(d=2048, layers=24, ffn=5461, vocab=32000),
    "7b": dict(d=4096, layers=32, ffn=11008, vocab=32000),
}
HTMUON_METHODS = ["eigh", "gram32", "gram_rr", "tracked_ns"]
MUON_METHODS = ["ns5", "polar_express"]  # p = 0; "ns5" is the baseline every ratio is taken to


def htmuon_methods() -> list[str]:
    """The HTMuon methods modelled: the fixed list, plus ``fast_ns``/``log_ns`` once registered."""
    from htmuon_dist.spectral import available_methods

    return HTMUON_METHODS + [m for m in ("fast_ns", "log_ns") if m in available_methods()]


@dataclass
class Profile:
    """Per-method times at shapes (m >= n) and the rates used to compose what is missing."""

    name: str
    times: dict[str, dict[tuple[int, int], float]] = field(default_factory=dict)
    eigh_points: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # dtype -> (n, s)
    rates: dict[str, float] = field(default_factory=dict)  # dtype -> FLOP/s of matmul
    notes: list[str] = field(default_factory=list)
    # (method, m, n) -> priced seconds for methods the profile did not measure (gpu_cost.price)
    pricer: Optional[Callable[[str, int, int], float]] = None

    def add(self, method: str, m: int, n: int, seconds: float) -> None:
        self.times.setdefault(method, {})[(max(m, n), min(m, n))] = seconds


# --- profiles ---------------------------------------------------------------------------------

def h100_probe() -> Profile:
    """The committed H100 probe (benchmarks/results/spectral_h100.md): measured eigh32/eigh64 at
    n = 512..4096, bf16 NS5 at four shapes, fp32 matmul ~50 TFLOP/s. The fp64 matmul rate was
    not measured: assumed 50 TFLOP/s (H100 SXM FP64 tensor-core peak 67)."""
    p = Profile("h100-probe (benchmarks/results/spectral_h100.md)")
    p.eigh_points = {"float32": [(512, 14.88e-3), (1024, 11.35e-3), (2048, 26.13e-3), (4096, 96.8e-3)],
                     "float64": [(512, 5.07e-3), (1024, 11.49e-3), (2048, 27.9e-3), (4096, 126.9e-3)]}
    for shape, ms in [((2048, 5461), 4.246), ((5461, 2048), 3.835), ((4096, 11008), 6.919), ((4096, 4096), 3.446)]:
        prev = p.times.get("ns5", {}).get((max(shape), min(shape)), 0.0)
        p.add("ns5", *shape, max(prev, ms * 1e-3))  # both orientations: the slower
    p.rates = {"float32": 50e12, "float64": 50e12, "bfloat16": 600e12}
    p.pricer = _gpu_cost_price
    p.notes = ["eigh/NS5/fp32-matmul times measured on an H100 (probe); fp64 matmul 50 TFLOP/s assumed",
               "every other method (and eigh) PRICED by benchmarks/gpu_cost.py from those (not timed on a GPU)"]
    return p


# dtype of the owner's matrices when pricing: the wire's (--comm-bytes 2: bf16 momentum, whose
# noise cutoff lets tracked_ns/fast_ns lift from a higher floor; 4: float32). Set by main().
PRICED_INPUT = "float32"


def _gpu_cost_price(method: str, m: int, n: int) -> float:
    """gpu_cost's priced seconds, the slower orientation (as the probe's NS5 times here: a shape
    key (m, n) with m >= n stands for both), for an input of dtype PRICED_INPUT."""
    import gpu_cost
    import torch

    power = 0.0 if method in MUON_METHODS else 0.125
    dtype = getattr(torch, PRICED_INPUT)
    return max(gpu_cost.price(method, m, n, power, dtype), gpu_cost.price(method, n, m, power, dtype))


def cpu_profile(sizes: list[int], repeat: int, threads: int = 1) -> Profile:
    """Measures every method here at n in ``sizes`` for the two aspect ratios of 1B/7B matrices
    (square and ~2.7:1), fp32 input; larger shapes are scaled by FLOP cost from the largest."""
    import torch

    from htmuon_dist.spectral import newton_schulz5, spectral_power
    from spectral import best_time

    torch.set_num_threads(threads)  # 1 by default: stable on a shared machine (spin-waiting
    # OpenMP threads under contention measured 10-100x slow here)
    p = Profile(f"cpu (measured here, {torch.get_num_threads()} threads, n = {sizes})")
    gen = torch.Generator().manual_seed(0)
    for n in sizes:
        for m in (n, int(round(n * 2.6875))):  # 4096 x 11008 and 2048 x 5461 are both ~2.69
            x = torch.randn(m, n, generator=gen)
            for method in MUON_METHODS + htmuon_methods():
                fn = ((lambda: newton_schulz5(x)) if method == "ns5" else
                      (lambda: spectral_power(x, 0.0 if method in MUON_METHODS else 0.125, method=method)))
                p.add(method, m, n, best_time(fn, torch.device("cpu"), repeat))
            print(f"  measured n = {n}, m = {m}: " + ", ".join(
                f"{k} {v[(m, n)] * 1e3:.1f} ms" for k, v in p.times.items()), flush=True)
    a = torch.randn(512, 512)
    t0 = time.perf_counter()
    for _ in range(5):
        a @ a
    p.rates = {"float32": 5 * 2 * 512**3 / (time.perf_counter() - t0)}
    p.rates["bfloat16"] = p.rates["float32"]  # forward+backward on CPUs runs fp32
    p.notes = [f"all method times measured on this CPU at n = {sizes} and scaled to 1B/7B shapes by FLOP cost",
               f"CPU fp32 matmul measured {p.rates['float32'] / 1e9:.1f} GFLOP/s"]
    return p


def report_profile(path: Path, base: Profile) -> Profile:
    """Method times from a GPU report: ``benchmarks/spectral.py --json`` rows, or
    gpu_acceptance.py's JSON (its ``spectral`` section holds the same rows)."""
    data = json.loads(path.read_text())
    rows = data.get("rows") or data.get("spectral", {}).get("rows") or []
    if not rows:
        raise SystemExit(f"step_model.py: error: --gpu-report {path} has no spectral rows")
    p = Profile(f"report {path} ({data.get('device') or data.get('spectral', {}).get('device')})",
                eigh_points=base.eigh_points, rates=dict(base.rates), pricer=base.pricer)
    for row in rows:
        m, n = row["shape"]
        name = row.get("resolved", row["method"]) if row["method"] == "auto" else row["method"]
        prev = p.times.get(name, {}).get((max(m, n), min(m, n)), 0.0)
        p.add(name, m, n, max(prev, float(row["time_s"])))
    p.notes = [f"method times measured in {path}; missing shapes scaled by FLOP cost"] + base.notes[:1]
    return p


# --- per-matrix time --------------------------------------------------------------------------

def _eigh_time(p: Profile, dtype: str, n: int) -> float:
    pts = sorted(p.eigh_points.get(dtype) or p.eigh_points.get("float64") or [])
    if not pts:
        raise KeyError("no eigh measurements in the profile")
    lo, hi = (pts[-2], pts[-1]) if n >= pts[-1][0] else next(
        ((a, b) for a, b in zip(pts, pts[1:]) if a[0] <= n <= b[0]), (pts[0], pts[1]))
    b = math.log(hi[1] / lo[1]) / math.log(hi[0] / lo[0])
    return lo[1] * (n / lo[0]) ** b


def _composed(p: Profile, method: str, m: int, n: int) -> float:
    r32, r64 = p.rates["float32"], p.rates.get("float64", p.rates["float32"] / 2)
    if method == "eigh":  # fp64 Gram, eigh, V D V^T, M (V D V^T)
        return (2 * m * n * n + 2 * n**3 + 2 * m * n * n) / r64 + _eigh_time(p, "float64", n)
    if method == "gram32":  # the well-conditioned case; a fallback adds the eigh row
        return (2 * m * n * n + 2 * n**3 + 2 * m * n * n) / r32 + _eigh_time(p, "float32", n)
    if method == "gram_rr":
        return (5 * 2 * m * n * n + 2 * n**3) / r32 + _eigh_time(p, "float32", n) + _eigh_time(p, "float64", n)
    if method == "tracked_ns":  # 12 lift steps + the final polynomial, IEEE fp32
        return 13 * (4 * m * n * n + 4 * n**3) / r32
    if method == "ns5":
        a = m / n
        return (20 * a + 10) * n**3 / p.rates["bfloat16"]
    raise KeyError(method)


def matrix_time(p: Profile, method: str, m: int, n: int) -> float:
    """Seconds for one (m, n) matrix with ``method`` under profile ``p``."""
    from htmuon_dist.spectral import method_cost

    m, n = max(m, n), min(m, n)
    measured = p.times.get(method, {})
    if (m, n) in measured:
        return measured[(m, n)]
    if measured:
        # the largest measured size of the nearest aspect ratio, scaled by the method's FLOP
        # cost (a free power-law fit on small, noisy CPU timings extrapolates wildly)
        def key(kv):
            (mm, nn), _ = kv
            return (round(abs(math.log((mm / nn) / (m / n))), 1), -nn)
        (mm, nn), t = min(measured.items(), key=key)
        return t * method_cost(method, m, n) / method_cost(method, mm, nn)
    if p.pricer is not None:
        return p.pricer(method, m, n)
    return _composed(p, method, m, n)


# --- the step ---------------------------------------------------------------------------------

def hidden_matrices(model: str) -> list[tuple[int, int]]:
    c = MODELS[model]
    d, f = c["d"], c["ffn"]
    return [(d, d)] * 4 * c["layers"] + [(f, d), (f, d), (d, f)] * c["layers"]


def n_params(model: str) -> int:
    c = MODELS[model]
    return sum(m * n for m, n in hidden_matrices(model)) + 2 * c["vocab"] * c["d"] + (2 * c["layers"] + 1) * c["d"]


def max_owner_load(times: list[float], world: int) -> float:
    load = [0.0] * min(world, len(times))
    for t in sorted(times, reverse=True):
        i = min(range(len(load)), key=load.__getitem__)
        load[i] += t
    return max(load)


def step_times(p: Profile, model: str, world: int, args: argparse.Namespace) -> dict:
    c = MODELS[model]
    mats = hidden_matrices(model)
    tokens = args.global_tokens / world if args.global_tokens else args.tokens_per_rank
    flops_token = 6 * n_params(model) + 12 * c["layers"] * c["d"] * args.seq_len
    fwd_bwd = flops_token * tokens / (args.peak_tflops * 1e12 * args.mfu)
    hidden = sum(m * n for m, n in mats)
    per_rank = max(hidden / world, max(m * n for m, n in mats))
    bw = (args.intra_gbps if world <= 8 else args.inter_gbps) * 1e9
    exchange = 2 * per_rank * args.comm_bytes / bw
    elementwise = 10 * 4 * hidden / world / (args.hbm_tbps * 1e12)
    out = {"model": model, "W": world, "tokens_per_rank": tokens, "fwd_bwd_s": fwd_bwd,
           "exchange_s": exchange, "elementwise_s": elementwise, "methods": {}}
    spectral = {}
    for method in MUON_METHODS + htmuon_methods():
        spectral[method] = max_owner_load([matrix_time(p, method, m, n) for m, n in mats], world)
    for method in htmuon_methods():
        out["methods"][f"htmuon {method}"] = spectral[method]
    k = args.interval
    out["methods"][f"htmuon_interval eigh (k={k})"] = (spectral["eigh"] + (k - 1) * spectral["ns5"]) / k
    for method in MUON_METHODS:
        out["methods"][f"muon {method}"] = spectral[method]
    for name, t in out["methods"].items():
        out["methods"][name] = {"spectral_s": t, "step_s": t + exchange + elementwise,
                                "fraction": (t + exchange + elementwise) / fwd_bwd}
    muon = out["methods"]["muon ns5"]["step_s"]
    for v in out["methods"].values():
        v["x_muon_step"] = v["step_s"] / muon
    return out


def markdown_table(rows: list[dict], method: str) -> list[str]:
    """HTMuon with ``method`` (and eigh) against Muon (NS5, Polar Express) per model and W: step
    ms, % of forward+backward, and the ratio to Muon's NS5 step."""
    key = f"htmuon {method}"
    if rows and key not in rows[0]["methods"]:
        raise SystemExit(f"step_model.py: error: --markdown {method}: not a modelled HTMuon method "
                         f"({sorted(k for k in rows[0]['methods'] if k.startswith('htmuon '))})")
    cols = ["muon ns5", "muon polar_express", key, "htmuon eigh"]
    out = ["| model | W | fwd+bwd (ms) | " + " | ".join(cols) + f" | {key} / muon ns5 |",
           "|---|---|---|" + "---|" * (len(cols) + 1)]
    for r in rows:
        cells = [f"{r['methods'][c]['step_s'] * 1e3:.1f} ms ({r['methods'][c]['fraction'] * 100:.1f}%)" for c in cols]
        out.append(f"| {r['model'].upper()} | {r['W']} | {r['fwd_bwd_s'] * 1e3:.0f} | " + " | ".join(cells)
                   + f" | {r['methods'][key]['x_muon_step']:.2f}× |")
    return out


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=["h100-probe", "cpu"], default="h100-probe",
                    help="where per-method times come from (default: the committed H100 probe)")
    ap.add_argument("--gpu-report", type=Path, default=None,
                    help="a GPU report (spectral.py --json or gpu_acceptance.py's report.json): its times win")
    ap.add_argument("--cpu-sizes", default="96,160,256", help="--profile cpu: n values to time (comma list)")
    ap.add_argument("--repeat", type=int, default=2, help="--profile cpu: best of N")
    ap.add_argument("--threads", type=int, default=1, help="--profile cpu: torch threads")
    ap.add_argument("--models", default="1b,7b")
    ap.add_argument("--worlds", default="8,16,32,64,128,256,512,1024")
    ap.add_argument("--tokens-per-rank", type=float, default=16384, help="tokens per rank per step (8 x 2048)")
    ap.add_argument("--global-tokens", type=float, default=None, help="fix the global batch instead (tokens)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak per GPU (H100 SXM: 989)")
    ap.add_argument("--mfu", type=float, default=0.40, help="model FLOP utilisation of forward+backward")
    ap.add_argument("--intra-gbps", type=float, default=300.0, help="per-GPU GB/s within a node (NVLink)")
    ap.add_argument("--inter-gbps", type=float, default=45.0, help="per-GPU GB/s across nodes (400 Gb/s NIC)")
    ap.add_argument("--comm-bytes", type=int, default=4, help="bytes per exchanged element (4 fp32, 2 bf16)")
    ap.add_argument("--hbm-tbps", type=float, default=3.35, help="HBM TB/s (elementwise optimizer work)")
    ap.add_argument("--interval", type=int, default=5, help="htmuon_interval's k")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--markdown", default=None, metavar="METHOD",
                    help="also print a Markdown table of HTMuon with METHOD (and eigh) against Muon's step")
    args = ap.parse_args(argv)
    global PRICED_INPUT
    PRICED_INPUT = "bfloat16" if args.comm_bytes == 2 else "float32"
    if args.profile == "cpu":
        args.peak_tflops = args.peak_tflops if "--peak-tflops" in (argv or sys.argv) else None
        prof = cpu_profile([int(s) for s in args.cpu_sizes.split(",")], args.repeat, args.threads)
        if args.peak_tflops is None:  # a CPU "cluster": forward+backward at the measured CPU rate
            args.peak_tflops = prof.rates["float32"] / 1e12
    else:
        prof = h100_probe()
    if args.gpu_report:
        prof = report_profile(args.gpu_report, prof)

    print(f"profile: {prof.name}")
    for note in prof.notes:
        print(f"  - {note}")
    if prof.pricer is not None:
        print(f"  - priced methods see {PRICED_INPUT} matrices (the wire dtype of --comm-bytes {args.comm_bytes}) "
              f"and its default noise cutoff")
    scaling = (f"global batch {args.global_tokens:.0f} tokens (/W per rank)" if args.global_tokens
               else f"{args.tokens_per_rank:.0f} tokens per rank (weak scaling)")
    print(f"assumptions: forward+backward = (6N + 12 L d s) x tokens / ({args.peak_tflops:g} TFLOP/s x MFU "
          f"{args.mfu:g}); {scaling}, s = {args.seq_len}; exchange {args.comm_bytes} B/elem at "
          f"{args.intra_gbps:g} GB/s (W <= 8) / {args.inter_gbps:g} GB/s (W > 8); HBM {args.hbm_tbps:g} TB/s; "
          f"Σ^p serial per owner, owners balanced largest-first; hidden matrices only (Muon convention)")
    print("per-matrix Σ^p times used (ms):")
    for model in args.models.split(","):
        for shape in sorted(set(hidden_matrices(model))):
            print(f"  {model} {shape[0]}x{shape[1]}: " + ", ".join(
                f"{meth} {matrix_time(prof, meth, *shape) * 1e3:.1f}" for meth in MUON_METHODS + htmuon_methods()))
    rows = []
    for model in args.models.split(","):
        mats = hidden_matrices(model)
        print(f"\nLLaMA-{model.upper()}: {n_params(model) / 1e9:.2f}B parameters, {len(mats)} hidden matrices. "
              f"Optimizer step (Σ^p of the most loaded owner + exchange + elementwise), ms, and its fraction "
              f"of forward+backward; '*' marks < 10%")
        names = None
        for world in [int(w) for w in args.worlds.split(",")]:
            r = step_times(prof, model, world, args)
            rows.append(r)
            if names is None:
                names = list(r["methods"])
                print(f"{'W':>5} {'fwd+bwd':>9} {'exch':>7} " + " ".join(f"{n:>24}" for n in names))
            cells = []
            for n in names:
                v = r["methods"][n]
                mark = "*" if v["fraction"] < 0.10 else " "
                cells.append(f"{v['step_s'] * 1e3:>11.1f} ms {v['fraction'] * 100:>7.1f}%{mark}")
            print(f"{world:>5} {r['fwd_bwd_s'] * 1e3:>7.0f}ms {r['exchange_s'] * 1e3:>5.1f}ms " + " ".join(f"{c:>24}" for c in cells))
        under = {n: [r["W"] for r in rows if r["model"] == model and r["methods"][n]["fraction"] < 0.10] for n in names}
        for n, ws in under.items():
            print(f"  {n}: under 10% at W = {ws if ws else 'none of ' + args.worlds}")
        here = [r for r in rows if r["model"] == model]
        print(f"  step / Muon (ns5) step at W = {[r['W'] for r in here]}:")
        for n in names:
            ratios = [r["methods"][n]["x_muon_step"] for r in here]
            print(f"    {n:<28} " + " ".join(f"{q:6.2f}x" for q in ratios) + f"   worst {max(ratios):.2f}x")
    if args.markdown:
        print()
        print("\n".join(markdown_table(rows, args.markdown)))
    if args.json:
        args.json.write_text(json.dumps({"profile": prof.name, "notes": prof.notes, "args": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
