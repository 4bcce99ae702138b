"""Run a function on W gloo ranks (spawned processes) and collect what each returns.

``run_ranks(fn, W, *args)`` starts W processes with a fresh TCP rendezvous on 127.0.0.1, calls
``fn(rank, world_size, *args)`` in each after ``init_process_group("gloo")``, and returns the
per-rank results. An exception in any rank fails the call with that rank's traceback; a rank
that does not finish within ``timeout`` seconds is killed and fails the call.

A run is judged by its results, not by how the processes exit: each rank writes its result
file (atomically) *before* ``destroy_process_group`` and interpreter shutdown. torch 2.13's
FSDP2-on-gloo teardown sometimes aborts a process there ("terminate called without an active
exception", exit -6; docs/upstream/fsdp2_gloo_exit_abort.md); such an abort after the result
is printed to stderr (visible in the test log) and counted in :data:`EXIT_ABORTS`, and is not
a failure. A rank that dies before writing its result fails the call as before.

Ranks are forked from one ``forkserver`` per test session that has imported torch, its
distributed packages and this library once (:data:`PRELOAD`): a spawned rank spent 3-6 s of
every multi-rank test importing them again. The server holds no threads and no process group,
so each fork starts clean. A rank gets the parent's environment *as of the call* (the server's
own is from its start), so tests that set variables before ``run_ranks`` still see them.
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import tempfile
import sys
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp

# Imported once in the fork server; a module missing here is imported by each rank as before.
PRELOAD = ["torch", "torch.distributed", "torch.distributed.tensor", "torch.distributed.fsdp",
           "torch.distributed.checkpoint", "torch.nn.parallel", "htmuon_dist",
           "transformers.models.llama.modeling_llama"]

# (world size, rank, exit code) of every rank that exited non-zero after writing its result.
EXIT_ABORTS: list[tuple[int, int, int]] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _context():
    """The fork-server context, preloading :data:`PRELOAD` (set once: the server starts on first use)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _worker(rank, world, port, fn, args, out_dir, pg_timeout, env):
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    result: Any
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=pg_timeout))
        result = ("ok", fn(rank, world, *args))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        result = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    # The result first, atomically: what follows (teardown, interpreter exit) may abort.
    path = os.path.join(out_dir, f"rank{rank}.pkl")
    with open(path + ".tmp", "wb") as f:
        pickle.dump(result, f)
    os.replace(path + ".tmp", path)
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - the result is already written
        pass


def run_ranks(fn: Callable, world_size: int, *args, timeout: float = 240.0,
              pg_timeout: float = 60.0, expect_errors: bool = False) -> list:
    """Runs ``fn`` on ``world_size`` ranks. With ``expect_errors`` the raw ("ok"|"error", value)
    pairs are returned instead of raising on a rank's error."""
    ctx = _context()
    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, out_dir, pg_timeout,
                                                          dict(os.environ)))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
        for p in procs:
            remaining = (deadline - datetime.datetime.now()).total_seconds()
            p.join(max(remaining, 0.1))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        if hung:
            raise TimeoutError(f"ranks {hung} of {world_size} did not finish within {timeout} s")
        results = []
        for r in range(world_size):
            path = os.path.join(out_dir, f"rank{r}.pkl")
            if not os.path.exists(path):  # e.g. gloo aborts the process on a size mismatch
                results.append(("crashed", f"rank {r} died with exit code {procs[r].exitcode}"))
                continue
            if procs[r].exitcode != 0:
                EXIT_ABORTS.append((world_size, r, procs[r].exitcode))
                print(f"multirank: rank {r} of {world_size} ({getattr(fn, '__name__', fn)}) exited with "
                      f"{procs[r].exitcode} after writing its result: an abort at exit (FSDP2/gloo teardown, "
                      f"docs/upstream/fsdp2_gloo_exit_abort.md); judged by its result", file=sys.stderr, flush=True)
            with open(path, "rb") as f:
                results.append(pickle.load(f))
    if expect_errors:
        return results
    errors = [f"rank {r}: {v}" for r, (status, v) in enumerate(results) if status != "ok"]
    if errors:
        raise AssertionError("\n".join(errors))
    return [v for _, v in results]
