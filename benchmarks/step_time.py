"""Measures HTMuon.step() on the tiny LLaMA of the tests, the code of this checkout against a
baseline checkout, in one run: one process and FSDP2 over 2 gloo ranks, CPU.

    python benchmarks/step_time.py --baseline /tmp/baseline [--also before=/tmp/before] [--steps 30] [--repeats 4]

Each (code, setting) pair runs in its own fresh process (the two checkouts define the same
package); the pairs are interleaved repeat by repeat so that load from other processes on
the machine falls on both alike. A process trains ``--steps`` optimizer steps (forward and
backward untimed), times each ``opt.step()`` after 3 warm-up steps with
``time.perf_counter`` and reports the median; under FSDP2 each rank times its own step and
the slower rank's median counts. The table gives the median over repeats of those medians
and the spread (min-max) over repeats. One thread per process (``torch.set_num_threads(1)``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def _train(rank: int, world: int, steps: int, backend: str) -> list[float]:
    import torch

    from dist_models import build, loss_fn, make_batches, wrap
    from htmuon_dist import HTMuon, param_groups

    torch.set_num_threads(1)
    model = build("llama")
    wrapped = wrap(model, "llama", backend)
    opt = HTMuon(param_groups(model, "reference"), lr=0.02, power=0.125, weight_decay=0.1,
                 adamw_lr=3e-3, adamw_weight_decay=0.01)
    per = 2
    batches = make_batches("llama", steps, 1, per * world)
    lo, hi = rank * per, (rank + 1) * per
    times = []
    for k in range(steps):
        loss_fn("llama", wrapped, batches[k][0][lo:hi]).backward()
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
        opt.zero_grad()
    return times[3:]


def _rank_main(rank: int, world: int, port: int, steps: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    times = _train(rank, world, steps, "fsdp2")
    Path(f"{out}.{rank}").write_text(json.dumps(times))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # FSDP2 on gloo can abort at interpreter exit (docs/distributed.md)


def worker(world: int, steps: int) -> float:
    """Median step seconds (the slower rank's under FSDP2), in this process's checkout."""
    if world == 1:
        return statistics.median(_train(0, 1, steps, "none"))
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times")
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_rank_main, args=(r, world, port, steps, out)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(600)
        medians = [statistics.median(json.loads(Path(f"{out}.{r}").read_text())) for r in range(world)]
    return max(medians)


def _run(root: Path, world: int, steps: int) -> float:
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{root / 'tests'}", OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--world", str(world),
           "--steps", str(steps)]
    done = subprocess.run(cmd, env=env, cwd=str(root), capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        raise RuntimeError(f"{root} world {world} failed:\n{done.stderr[-3000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", type=Path, help="a checkout of the code to compare against")
    ap.add_argument("--also", action="append", default=[], metavar="NAME=PATH",
                    help="more checkouts timed in the same run (e.g. the branch before a change)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--worlds", default="1,2")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(worker(args.world, args.steps))
        return
    if args.baseline is None:
        ap.error("--baseline is required")
    worlds = [int(w) for w in args.worlds.split(",")]
    codes = {"baseline": args.baseline.resolve()}
    for item in args.also:
        name, sep, path = item.partition("=")
        if not sep or not name or name in ("baseline", "this"):
            ap.error(f"--also takes NAME=PATH with a new NAME, got {item!r}")
        codes[name] = Path(path).resolve()
    codes["this"] = HERE
    results: dict[tuple[str, int], list[float]] = {}
    for rep in range(args.repeats):
        order = list(codes.items()) if rep % 2 == 0 else list(reversed(list(codes.items())))
        for world in worlds:
            for name, root in order:
                results.setdefault((name, world), []).append(_run(root, world, args.steps))
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"HTMuon.step() on the tiny LLaMA, measured; CPU {cpu}, 1 thread per process, "
          f"{os.cpu_count()} logical CPUs shared with other jobs")
    print("  ".join(f"{name}: {root}" for name, root in codes.items())
          + f"  steps {args.steps} (3 warm-up), repeats {args.repeats}")
    print(f"{'setting':<16}{'code':<10}{'median ms':>10}{'min ms':>9}{'max ms':>9}")
    for world in worlds:
        label = "one process" if world == 1 else f"FSDP2 x{world}"
        for name in codes:
            xs = [x * 1e3 for x in results[(name, world)]]
            print(f"{label:<16}{name:<10}{statistics.median(xs):>10.2f}{min(xs):>9.2f}{max(xs):>9.2f}")
        base = statistics.median(results[("baseline", world)])
        for name in codes:
            if name != "baseline":
                ratio = statistics.median(results[(name, world)]) / base
                print(f"{label:<16}{name[:5] + '/base':<10}{ratio:>10.3f}")


if __name__ == "__main__":
    main()
