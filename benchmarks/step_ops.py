"""Counts the aten operator calls (and profiler self-CPU time) inside HTMuon.step() of the tests'
tiny LLaMA: one process, 1 thread, steps 10-29, with torch.profiler. The call count does not
depend on the machine's load, so it compares checkouts on a busy machine where timings cannot:

    python benchmarks/step_ops.py [--top 25]
    PYTHONPATH=<other checkout> python benchmarks/step_ops.py      (that checkout's htmuon_dist)

Prints ``aten calls/step N  self CPU/step T ms  of which eigh E ms`` and, with ``--top K``, the K
most frequent ops with their calls per step.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# the tiny LLaMA and its batches live with the tests
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

WARMUP, MEASURED = 10, 20


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--top", type=int, default=0, help="also list the K most frequent aten ops (default 0)")
    args = ap.parse_args(argv)
    if args.top < 0:
        ap.error(f"--top must be >= 0, got {args.top}")

    import torch

    torch.set_num_threads(1)
    from dist_models import build, loss_fn, make_batches, wrap
    from htmuon_dist import HTMuon, param_groups

    model = build("llama")
    wrapped = wrap(model, "llama", "none")
    opt = HTMuon(param_groups(model, "reference"), lr=0.02, power=0.125, weight_decay=0.1,
                 adamw_lr=3e-3, adamw_weight_decay=0.01)
    batches = make_batches("llama", WARMUP + MEASURED, 1, 2)
    cpu = [torch.profiler.ProfilerActivity.CPU]
    prof = torch.profiler.profile(activities=cpu)
    for k in range(WARMUP + MEASURED):
        loss_fn("llama", wrapped, batches[k][0]).backward()
        if k == WARMUP:
            prof.start()
        elif k > WARMUP:
            prof.toggle_collection_dynamic(True, cpu)
        opt.step()
        if k >= WARMUP:
            prof.toggle_collection_dynamic(False, cpu)
        opt.zero_grad()
    prof.stop()
    averages = prof.key_averages()
    aten = [e for e in averages if e.key.startswith("aten::")]
    calls = sum(e.count for e in aten)
    eigh = sum(e.self_cpu_time_total for e in aten if "eigh" in e.key)
    total = sum(e.self_cpu_time_total for e in averages)
    print(f"aten calls/step {calls / MEASURED:.0f}  self CPU/step {total / MEASURED / 1e3:.2f} ms  "
          f"of which eigh {eigh / MEASURED / 1e3:.2f} ms")
    for e in sorted(aten, key=lambda e: -e.count)[: args.top]:
        print(f"{e.key:<32}{e.count / MEASURED:>7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
