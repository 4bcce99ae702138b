"""A soak run: the tiny FSDP2 x 2 CPU run for many steps, watching for slow leaks.

    python benchmarks/soak.py [--steps 2000] [--warmup 100] [--save_steps 500] [--max_growth 2]

Samples each rank's resident memory (VmRSS from /proc) every ``--sample_s`` seconds together with
the step it reached, and reads every step's time from metrics.jsonl (logging every step).
Prints RSS per rank at the start (median of the samples in the first 10% of the steps after
``--warmup``: allocator pools and caches are filled by then) and at the end (median of the last
10%), the growth in %, the step-time drift (median
step time of the last 10% of steps against the first 10% after the warm-up, in %), and the
skipped steps. The first checkpoint allocates once (DCP writers, state-dict buffers), so the
growth is also printed from the first checkpoint on (``--save_steps`` + ``--warmup``); exit status
1 when that growth exceeds ``--max_growth`` % on any rank (or, without checkpoints, the growth
from the warm-up).

Step times on a shared machine move with the other load on it: the drift is printed, and only
judged against ``--max_growth`` when ``--strict_time`` is given.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reliability import logged_step, rank_pids, start, wait  # noqa: E402


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def step_times(out: Path) -> dict[int, float]:
    """step -> seconds, from tokens / tokens_per_s of each logged step (logging every step)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r and r.get("tokens_per_s")]
    times, prev = {}, 0
    for r in sorted(rows, key=lambda r: r["step"]):
        times[r["step"]] = (r["tokens"] - prev) / r["tokens_per_s"]
        prev = r["tokens"]
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps (default 2000)")
    p.add_argument("--warmup", type=int, default=100, help="steps before the start sample (default 100)")
    p.add_argument("--save_steps", type=int, default=500, help="checkpoint every N steps (default 500)")
    p.add_argument("--sample_s", type=float, default=2.0, help="seconds between RSS samples")
    p.add_argument("--max_growth", type=float, default=2.0, help="allowed RSS growth in %% (default 2)")
    p.add_argument("--strict_time", action="store_true", help="also fail when step time drifts more than --max_growth")
    p.add_argument("--cache", default=None, help="offline corpus/tokenizer cache (default $HTMUON_CACHE)")
    p.add_argument("--work", default=None, help="output directory (default: a temporary one)")
    p.add_argument("--json", default=None, help="also write the RSS samples (step, rank -> KiB) to this JSON file")
    p.add_argument("--report_only", action="store_true", help="print the figures of an earlier run in --work (same flags) without running")
    a = p.parse_args(argv)
    if a.warmup >= a.steps:
        p.error("--warmup must be below --steps")
    if a.report_only:
        if not a.work:
            p.error("--report_only needs --work")
        return report(Path(a.work), a)
    import os

    work = Path(a.work or tempfile.mkdtemp(prefix="htmuon_soak_"))
    work.mkdir(parents=True, exist_ok=True)
    cache = Path(a.cache or os.environ.get("HTMUON_CACHE") or work / "cache")
    out, log = work / "run", work / "soak.log"
    args = ["--max_steps", str(a.steps), "--save_steps", str(a.save_steps), "--warmup_steps", "10",
            "--export_model", "false", "--nonfinite", "skip", "--resume", "never"]
    t0 = time.perf_counter()
    proc = start(out, args, cache, log)
    samples: list[tuple[int, dict[int, int]]] = []  # (step, rank -> RSS KiB)
    while proc.poll() is None:
        time.sleep(a.sample_s)
        pids = rank_pids(proc.pid)
        step = logged_step(out)
        try:
            samples.append((step, {r: rss_kib(pid) for r, pid in pids.items()}))
        except (OSError, RuntimeError):
            pass  # a rank exiting between the listing and the read
    status, _ = wait(proc, 60)
    wall = time.perf_counter() - t0
    if status != 0:
        print(f"the soak run failed (exit {status}); see {log}")
        return 1
    (work / "rss_samples.json").write_text(json.dumps([(s_, r) for s_, r in samples if len(r) == 2]))
    if a.json:
        Path(a.json).write_text(json.dumps([(s_, r) for s_, r in samples if len(r) == 2]))
    return report(work, a, wall)


def _growth(live, lo: int, hi: int, end_span: int, steps: int, rank) -> tuple[float, float, int, int]:
    first = [d[rank] for s_, d in live if lo <= s_ < hi]
    last = [d[rank] for s_, d in live if s_ > steps - end_span]
    if not first or not last:
        raise SystemExit("too few RSS samples: use more --steps or a smaller --sample_s")
    a0, a1 = statistics.median(first), statistics.median(last)
    return a0, a1, len(first), len(last)


def report(work: Path, a, wall: Optional[float] = None) -> int:
    """Prints the figures from ``work`` (rss_samples.json and run/metrics.jsonl)."""
    out = work / "run"
    live = [(s_, {int(k): v for k, v in d.items()}) for s_, d in json.loads((work / "rss_samples.json").read_text())]
    span = max(1, (a.steps - a.warmup) // 10)
    summary = json.loads((out / "summary.json").read_text())
    times = step_times(out)
    n = max(1, (a.steps - a.warmup) // 10)
    early = [times[s] for s in range(a.warmup + 1, a.warmup + 1 + n) if s in times]
    late = [times[s] for s in range(a.steps - n + 1, a.steps + 1) if s in times]
    drift = 100 * (statistics.median(late) / statistics.median(early) - 1)
    print(f"soak: {a.steps} steps of the tiny LLaMA, FSDP2 x 2 on the CPU (gloo), checkpoint every {a.save_steps}"
          + (f"; {wall:.0f} s wall" if wall else ""))
    ok = True
    steady_from = a.save_steps + a.warmup if 0 < a.save_steps < a.steps - 2 * span else None
    for rank in sorted(live[-1][1]):
        a0, a1, n0, n1 = _growth(live, a.warmup, a.warmup + span, span, a.steps, rank)
        growth = 100 * (a1 / a0 - 1)
        line = (f"  rank {rank}: RSS median {a0 / 1024:.1f} MiB (steps {a.warmup}-{a.warmup + span - 1}, {n0} samples) -> "
                f"{a1 / 1024:.1f} MiB (last {span} steps, {n1} samples): {growth:+.2f}%")
        if steady_from is not None:
            # The first checkpoint allocates once (DCP writers, state-dict buffers): growth
            # measured after it shows whether anything keeps growing.
            b0, b1, _, _ = _growth(live, steady_from, steady_from + span, span, a.steps, rank)
            steady = 100 * (b1 / b0 - 1)
            line += f"; after the first checkpoint (from step {steady_from}): {steady:+.2f}%"
            ok &= steady <= a.max_growth
        else:
            ok &= growth <= a.max_growth
        print(line + f"; max {max(d[rank] for _, d in live) / 1024:.1f} MiB")
    print(f"  step time: median {statistics.median(early) * 1000:.1f} ms (steps {a.warmup + 1}-{a.warmup + n}) -> "
          f"{statistics.median(late) * 1000:.1f} ms (last {n} steps): drift {drift:+.2f}%")
    print(f"  skipped steps: {summary.get('skipped_steps', 0)}; final eval loss {summary.get('eval_loss', float('nan')):.4f}")
    if a.strict_time:
        ok &= abs(drift) <= a.max_growth
    what = "RSS after the first checkpoint" if steady_from is not None else "RSS"
    print(f"  verdict: {'within' if ok else 'OUTSIDE'} {a.max_growth}% ({what}{' and step time' if a.strict_time else ''})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
