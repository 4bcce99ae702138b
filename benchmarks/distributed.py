"""Prints the exchange engine's plan balance and measured per-rank Σ^p time.

    python benchmarks/distributed.py balance [--worlds 8,64,512] [--model 1b]
    python benchmarks/distributed.py timing  [--worlds 1,2,4] [--model 60m] [--method eigh]

``balance``: owner plans for every matrix of a LLaMA size (both routing conventions) with the
cost model of the chosen method: max/mean per-rank cost and the busiest rank's share.
``timing``: spawns W gloo processes on this machine (1 thread each), gives each an FSDP2-style
row shard of every matrix of the model, and times ``ExchangeEngine.run`` (gather, Σ^p on the
owner, scatter) and its compute part on every rank. On a machine with fewer cores than W the
ranks share cores, so the wall time per step includes that contention; the compute column
(summed over the ranks' own matrices) is the per-rank work that the plan balances.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from htmuon_dist.distributed.engine import ExchangeEngine, SpectralSpec  # noqa: E402
from htmuon_dist.distributed.planner import make_plan  # noqa: E402
from htmuon_dist.spectral import method_cost  # noqa: E402

# hidden, ffn, layers, vocab (REFERENCE.md)
SIZES = {
    "60m": (512, 1376, 8, 32000),
    "135m": (768, 2048, 12, 32000),
    "350m": (1024, 2736, 24, 32000),
    "1b": (2048, 5461, 24, 32000),
    "7b": (4096, 11008, 32, 32000),
}


def llama_matrices(size: str, convention: str) -> list[tuple[str, tuple[int, int]]]:
    """(name, (rows, cols)) of every HTMuon matrix of a LLaMA, nn.Linear weight layout."""
    hidden, ffn, layers, vocab = SIZES[size]
    out = []
    for layer in range(layers):
        for proj in ("q", "k", "v", "o"):
            out.append((f"layers.{layer}.self_attn.{proj}_proj", (hidden, hidden)))
        out.append((f"layers.{layer}.mlp.gate_proj", (ffn, hidden)))
        out.append((f"layers.{layer}.mlp.up_proj", (ffn, hidden)))
        out.append((f"layers.{layer}.mlp.down_proj", (hidden, ffn)))
    if convention == "reference":
        out += [("embed_tokens", (vocab, hidden)), ("lm_head", (vocab, hidden))]
    return out


def balance(args) -> None:
    print(f"plan balance, LLaMA-{args.model}, cost model of method '{args.method}'")
    print(f"{'convention':>10} {'matrices':>8} {'W':>5} {'max/mean':>9} {'busiest %':>9} {'idle ranks':>10}")
    for convention in ("muon", "reference"):
        mats = llama_matrices(args.model, convention)
        shapes = [s for _, s in mats]
        costs = [method_cost(args.method, *s) for s in shapes]
        for world in args.worlds:
            plan = make_plan(shapes, costs, world)
            busiest = max(plan.loads) / sum(plan.loads) * 100
            idle = sum(1 for load in plan.loads if load == 0)
            print(f"{convention:>10} {len(mats):>8} {world:>5} {plan.balance:>9.3f} {busiest:>8.2f}% {idle:>10}")


def _rows(rows: int, world: int, rank: int) -> tuple[int, int]:
    chunk = -(-rows // world)  # FSDP2 uses torch.chunk on dim 0
    start = min(rank * chunk, rows)
    return start, min(start + chunk, rows)


def _timing_worker(rank, world, size, method, steps):
    import torch.distributed as dist

    mats = llama_matrices(size, "muon")
    shapes = [s for _, s in mats]
    ranges = []
    pieces = []
    g = torch.Generator().manual_seed(rank)
    for rows, cols in shapes:
        lo, hi = _rows(rows, world, rank)
        ranges.append((lo * cols, hi * cols))
        pieces.append(torch.randn((hi - lo) * cols, generator=g))
    spec = SpectralSpec(power=0.125, method=method)
    group = dist.group.WORLD if world > 1 else None
    engine = ExchangeEngine(shapes, ranges, [spec] * len(shapes), [n for n, _ in mats], group=group)
    compute_times: list[float] = []
    inner = engine._compute

    def timed(*a, **k):
        start = time.perf_counter()
        out = inner(*a, **k)
        compute_times.append(time.perf_counter() - start)
        return out

    engine._compute = timed  # type: ignore[method-assign]
    engine.run(pieces)  # warm-up
    walls, computes = [], []
    for _ in range(steps):
        compute_times.clear()
        if group is not None:
            dist.barrier()
        start = time.perf_counter()
        engine.run(pieces)
        walls.append(time.perf_counter() - start)
        computes.append(sum(compute_times))
    owned = sum(1 for o in engine.plan.owners if o == rank)
    return dict(wall=statistics.median(walls), compute=statistics.median(computes), owned=owned,
                sent=engine.comm_bytes_last_step, balance=engine.plan.balance)


def timing(args) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from multirank import run_ranks

    n = len(llama_matrices(args.model, "muon"))
    print(f"exchange timing, LLaMA-{args.model} ({n} hidden matrices, FSDP2 row shards, fp32), "
          f"method {args.method}, median of {args.steps} steps, {torch.get_num_threads()} threads here")
    print(f"{'W':>3} {'rank':>4} {'owned':>5} {'Σ^p s/rank':>10} {'step wall s':>11} {'MB sent':>8} {'plan max/mean':>13}")
    for world in args.worlds:
        results = run_ranks(_timing_worker, world, args.model, args.method, args.steps, timeout=3000)
        for rank, r in enumerate(results):
            print(f"{world:>3} {rank:>4} {r['owned']:>5} {r['compute']:>10.3f} {r['wall']:>11.3f} "
                  f"{r['sent'] / 1e6:>8.2f} {r['balance']:>13.3f}")
        print(f"{world:>3} {'max':>4} {'':>5} {max(r['compute'] for r in results):>10.3f} "
              f"{max(r['wall'] for r in results):>11.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["balance", "timing"])
    parser.add_argument("--worlds", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--model", choices=sorted(SIZES))
    parser.add_argument("--method", default="eigh")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    if args.what == "balance":
        args.worlds = args.worlds or [8, 64, 512]
        args.model = args.model or "1b"
        balance(args)
    else:
        args.worlds = args.worlds or [1, 2, 4]
        args.model = args.model or "60m"
        timing(args)


if __name__ == "__main__":
    main()
