"""Several independent ``spectral_power`` calls at once: CUDA streams on GPUs, in order on CPUs.

An owner rank's bucket holds matrices of several shapes; each shape is one batched call, and
the calls do not depend on each other. On a GPU a float64 ``eigh`` of n = 4096 keeps one
cuSOLVER kernel chain busy for ~0.1 s while most of the chip idles, and ``torch.linalg.eigh``
waits on the host for its status flag. :func:`spectral_power_groups` therefore runs the jobs on
a small pool of CUDA streams, one host thread per stream, so that one stream's host wait and
its serial kernels overlap with the other streams' work.

Memory safety across streams (the caching allocator ties each block to the stream that
allocated it):
  * every lane stream first waits for the caller's current stream, so inputs produced there
    are complete; inputs are ``record_stream``-ed on the lane, so freeing them early is safe;
  * outputs are allocated on a lane stream and handed back to the caller: the caller's stream
    waits for every lane before this function returns, and every output is
    ``record_stream``-ed on the caller's stream, so its block is not reused by a later lane
    allocation while the caller still reads it.
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, ContextManager, Optional, Sequence

import torch

from . import spectral_power
from .registry import method_cost

# (batch (m, n) or (b, m, n), power, method name, rtol or None for the dtype's default)
Job = tuple[torch.Tensor, float, str, Optional[float]]

DEFAULT_STREAMS = int(os.environ.get("HTMUON_SPECTRAL_STREAMS", "4"))

_lock = threading.Lock()
_streams: dict[tuple[int, int], list] = {}
_executor: Optional[ThreadPoolExecutor] = None


def _job_cost(job: Job) -> float:
    x, power, method, _ = job
    b = x.shape[0] if x.ndim == 3 else 1
    try:
        return b * method_cost(method, x.shape[-2], x.shape[-1], power)
    except ValueError:  # unknown method: spectral_power raises the real error later
        return float(x.numel())


def plan_lanes(jobs: Sequence[Job], lanes: int) -> list[list[int]]:
    """Job indices per lane: largest cost first onto the least-loaded lane (deterministic).

    Lanes run their jobs in order, so the biggest jobs start first and finish together.
    """
    lanes = max(1, min(lanes, len(jobs)))
    order = sorted(range(len(jobs)), key=lambda i: (-_job_cost(jobs[i]), i))
    load = [0.0] * lanes
    out: list[list[int]] = [[] for _ in range(lanes)]
    for i in order:
        k = min(range(lanes), key=lambda j: (load[j], j))
        out[k].append(i)
        load[k] += _job_cost(jobs[i])
    return [lane for lane in out if lane]


def _pool(device: torch.device, count: int) -> list:
    """``count`` CUDA streams of ``device``, created once and reused (streams are cheap but not free)."""
    key = (device.index if device.index is not None else torch.cuda.current_device(), count)
    with _lock:
        if key not in _streams:
            with torch.cuda.device(key[0]):
                _streams[key] = [torch.cuda.Stream() for _ in range(count)]
        return _streams[key]


def _threads(count: int) -> ThreadPoolExecutor:
    global _executor
    with _lock:
        if _executor is None or _executor._max_workers < count:  # noqa: SLF001 - grow once
            _executor = ThreadPoolExecutor(max_workers=count, thread_name_prefix="htmuon-spectral")
        return _executor


def _run(job: Job) -> torch.Tensor:
    x, power, method, rtol = job
    return spectral_power(x, power, method=method, rtol=rtol)


def run_lanes(
    jobs: Sequence[Job],
    lanes: list[list[int]],
    lane_context: Callable[[int], ContextManager],
    after: Callable[[int, torch.Tensor], None] = lambda lane, out: None,
) -> list[torch.Tensor]:
    """Runs each lane's jobs in order on a worker thread inside ``lane_context(lane)``.

    ``after(lane, output)`` runs on the worker after each job (stream bookkeeping). The first
    exception of any lane is raised after every lane has finished. Grad mode is the caller's
    (it is thread-local in torch).
    """
    results: list[Optional[torch.Tensor]] = [None] * len(jobs)
    grad = torch.is_grad_enabled()

    def work(lane: int) -> None:
        with torch.set_grad_enabled(grad), lane_context(lane):
            for i in lanes[lane]:
                out = _run(jobs[i])
                after(lane, out)
                results[i] = out

    futures = [_threads(len(lanes)).submit(work, k) for k in range(len(lanes))]
    errors = [f.exception() for f in futures]
    for e in errors:
        if e is not None:
            raise e
    return results  # type: ignore[return-value]


def split_batches(jobs: Sequence[Job], parts: int) -> tuple[list[Job], list[list[int]]]:
    """Each (b, m, n) job with b > 1 becomes up to ``parts`` jobs of consecutive matrices
    (views, no copy), so that one shape's batch also spreads over the streams: a batched CUDA
    ``eigh`` of large matrices runs them one after another. Returns the sub-jobs and, per
    original job, the indices of its sub-jobs. Every method works matrix by matrix (the rank
    cutoff is per matrix), so a split batch gives the same matrices back."""
    sub: list[Job] = []
    owners: list[list[int]] = []
    for x, power, method, rtol in jobs:
        chunks = (torch.tensor_split(x, min(parts, x.shape[0]), dim=0)
                  if x.ndim == 3 and x.shape[0] > 1 and parts > 1 else (x,))
        owners.append(list(range(len(sub), len(sub) + len(chunks))))
        sub.extend((c, power, method, rtol) for c in chunks)
    return sub, owners


def merge_batches(outs: Sequence[torch.Tensor], owners: list[list[int]]) -> list[torch.Tensor]:
    """Inverse of :func:`split_batches` on the outputs (on the current stream)."""
    return [outs[idx[0]] if len(idx) == 1 else torch.cat([outs[i] for i in idx], dim=0) for idx in owners]


def _cuda_group(jobs: Sequence[Job], streams: int) -> list[torch.Tensor]:
    device = jobs[0][0].device
    caller = torch.cuda.current_stream(device)
    jobs, owners = split_batches(jobs, streams)
    lanes = plan_lanes(jobs, streams)
    pool = _pool(device, len(lanes))
    for k, lane in enumerate(lanes):
        pool[k].wait_stream(caller)  # inputs written on the caller's stream are complete
        for i in lane:
            jobs[i][0].record_stream(pool[k])

    def context(k: int) -> ContextManager:
        stack = contextlib.ExitStack()
        stack.enter_context(torch.cuda.device(device))  # the current device is per thread
        stack.enter_context(torch.cuda.stream(pool[k]))
        return stack

    try:
        results = run_lanes(jobs, lanes, context)
    finally:
        for k in range(len(lanes)):
            caller.wait_stream(pool[k])  # also on error: nothing of ours still runs behind the caller
    for out in results:
        out.record_stream(caller)
    return merge_batches(results, owners)  # on the caller's stream, after its wait on every lane


def spectral_power_groups(jobs: Sequence[Job], streams: Optional[int] = None) -> list[torch.Tensor]:
    """``[spectral_power(x, p, method, rtol) for (x, p, method, rtol) in jobs]``, concurrently.

    Args:
        jobs: independent calls; each ``x`` is (m, n) or (b, m, n) on any device.
        streams: CUDA streams (and host threads) to spread the jobs over; default
            ``HTMUON_SPECTRAL_STREAMS`` or 4. 1 runs in order on the caller's stream.

    Returns:
        The outputs in job order, each like ``spectral_power``'s (same shape and dtype). CUDA
        outputs are ready for use on the caller's current stream (no host sync needed).

    CPU jobs run in order: the CPU already spreads one ``eigh``/matmul over its cores, and
    concurrent LAPACK calls would only compete for them. On CUDA, batches are also split over
    the streams (:func:`split_batches`); jobs on different CUDA devices are grouped per device.
    """
    jobs = list(jobs)
    streams = DEFAULT_STREAMS if streams is None else int(streams)
    if streams < 1:
        raise ValueError(f"streams must be >= 1, got {streams}")
    results: list[Optional[torch.Tensor]] = [None] * len(jobs)
    by_device: dict[torch.device, list[int]] = {}
    for i, (x, *_rest) in enumerate(jobs):
        if x.is_cuda and streams > 1:
            by_device.setdefault(x.device, []).append(i)
        else:
            results[i] = _run(jobs[i])
    for indices in by_device.values():
        for i, out in zip(indices, _cuda_group([jobs[i] for i in indices], streams)):
            results[i] = out
    return results  # type: ignore[return-value]
