"""A soak run: the tiny FSDP2 x 2 CPU run for many steps, watching for slow leaks.

    python benchmarks/soak.py [--steps 2000] [--warmup 100] [--save_steps 500] [--max_growth 2]

Samples each rank's resident memory (VmRSS from /proc) every ``--sample_s`` seconds together with
the step it reached, and reads every step's time from metrics.jsonl (logging every step).
Prints RSS per rank at the start (median of the samples in the first 10% of the steps after
``--warmup``: allocator pools and caches are filled by then) and at the end (median of the last
10%), the growth in %, the step-time drift (median
step time of the last 10% of steps against the first 10% after the warm-up, in %), and the
skipped steps. Exit status 1 when RSS grows more than ``--max_growth`` % on any rank.

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
    a = p.parse_args(argv)
    if a.warmup >= a.steps:
        p.error("--warmup must be below --steps")
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
    live = [(s, r) for s, r in samples if len(r) == 2]
    if a.json:
        Path(a.json).write_text(json.dumps(live))
    # RSS moves by ~2% between samples (allocator pools): compare the medians of the first 10%
    # of the steps after the warm-up and of the last 10%, not two single samples.
    span = max(1, (a.steps - a.warmup) // 10)
    first_win = [r for s_, r in live if a.warmup <= s_ < a.warmup + span]
    last_win = [r for s_, r in live if s_ > a.steps - span]
    summary = json.loads((out / "summary.json").read_text())
    times = step_times(out)
    n = max(1, (a.steps - a.warmup) // 10)
    early = [times[s] for s in range(a.warmup + 1, a.warmup + 1 + n) if s in times]
    late = [times[s] for s in range(a.steps - n + 1, a.steps + 1) if s in times]
    drift = 100 * (statistics.median(late) / statistics.median(early) - 1)
    print(f"soak: {a.steps} steps of the tiny LLaMA, FSDP2 x 2 on the CPU (gloo), checkpoint every {a.save_steps}; "
          f"{wall:.0f} s wall")
    ok = True
    if not first_win or not last_win:
        print("too few RSS samples after the warm-up: use more --steps or a smaller --sample_s")
        return 1
    for rank in sorted(first_win[0]):
        a0 = statistics.median(r[rank] for r in first_win)
        a1 = statistics.median(r[rank] for r in last_win)
        growth = 100 * (a1 / a0 - 1)
        ok &= growth <= a.max_growth
        print(f"  rank {rank}: RSS median {a0 / 1024:.1f} MiB (steps {a.warmup}-{a.warmup + span - 1}, {len(first_win)} samples) "
              f"-> {a1 / 1024:.1f} MiB (last {span} steps, {len(last_win)} samples): {growth:+.2f}%; "
              f"max {max(d[rank] for _, d in live) / 1024:.1f} MiB")
    print(f"  step time: median {statistics.median(early) * 1000:.1f} ms (steps {a.warmup + 1}-{a.warmup + n}) -> "
          f"{statistics.median(late) * 1000:.1f} ms (last {n} steps): drift {drift:+.2f}%")
    print(f"  skipped steps: {summary.get('skipped_steps', 0)}; final eval loss {summary.get('eval_loss', float('nan')):.4f}")
    if a.strict_time:
        ok &= abs(drift) <= a.max_growth
    print(f"  verdict: {'within' if ok else 'OUTSIDE'} {a.max_growth}% ({'RSS and step time' if a.strict_time else 'RSS'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
