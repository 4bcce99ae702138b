"""tests/multirank.py judges a run by its results: an abort at interpreter exit after a rank
wrote its result (torch 2.13's FSDP2/gloo teardown does that now and then) is reported in the
log and is not a failure; a rank that dies before its result still fails the call."""

from __future__ import annotations

import multiprocessing.util
import os

import pytest
import torch
import torch.distributed as dist

import multirank
from multirank import run_ranks

pytestmark = pytest.mark.multirank


def _abort_at_exit(rank: int, world: int) -> int:
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    if rank == 1:
        # SIGABRT in the process's shutdown, after run_ranks' worker wrote the result, as the
        # teardown does. A multiprocessing finalizer, not atexit: a forked rank ends with
        # os._exit, which runs no atexit hook, while finalizers run in both start methods.
        multiprocessing.util.Finalize(None, os.abort, exitpriority=0)
    return int(t.item())


def _abort_before_result(rank: int, world: int) -> int:
    if rank == 1:
        os.abort()
    return rank


def test_an_abort_after_the_result_is_logged_not_failed(capfd):
    before = len(multirank.EXIT_ABORTS)
    assert run_ranks(_abort_at_exit, 2, timeout=120) == [1, 1]
    assert multirank.EXIT_ABORTS[before:] == [(2, 1, -6)]
    assert "rank 1 of 2 (_abort_at_exit) exited with -6 after writing its result" in capfd.readouterr().err


def test_a_rank_that_dies_before_its_result_fails_the_call():
    with pytest.raises(AssertionError, match="rank 1 died with exit code -6"):
        run_ranks(_abort_before_result, 2, timeout=120, pg_timeout=10)
