"""Measuring a call's memory from the CPU allocator's own records (importable by spawned ranks
and by benchmarks/memory.py)."""

from __future__ import annotations

from typing import Callable

from torch.profiler import ProfilerActivity, profile


def allocator_peak(fn: Callable[[], object]) -> int:
    """Peak bytes live at once during ``fn()`` above what was live before it.

    torch.profiler with ``profile_memory=True`` records every allocation and free of the CPU
    allocator (kernels' workspaces included); summing them in time order gives the live bytes.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak
