"""Fault injection for the reliability tests and ``benchmarks/reliability.py``.

``HTMUON_FAULT_INJECT`` holds comma-separated faults (e.g. ``save:3,nan:1-2``), read by
:func:`_spec` alone, the one parser for every fault; unset, every function here is a no-op:

* ``save:N``       every rank dies (exit 17) mid-save of the step-N checkpoint (checkpoint.py)
* ``sigterm:N``    every rank sends itself SIGTERM right after step N (``sigterm:N@R``: rank R only)
* ``nan:A-B``      rank 0's loss is NaN on steps A..B (``nan:A+``: from step A on), so its
                   gradients are non-finite
"""

from __future__ import annotations

import os
import signal
from typing import Optional

import torch


def _spec(kind: str) -> Optional[str]:
    """The value of fault ``kind`` in ``HTMUON_FAULT_INJECT`` (``"3"`` for ``save:3``), or None."""
    for part in os.environ.get("HTMUON_FAULT_INJECT", "").split(","):
        name, _, value = part.strip().partition(":")
        if name == kind:
            return value
    return None


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def dies_mid_save(step: int) -> bool:
    """``save:N``: True while saving the step-N checkpoint (checkpoint.save then exits 17)."""
    value = _spec("save")
    return value is not None and int(value) == step


def maybe_signal(step: int) -> None:
    """``sigterm:N[@R]``: a real SIGTERM to this process after step N (handled like SLURM's)."""
    value = _spec("sigterm")
    if value is None:
        return
    at, _, rank = value.partition("@")
    if step == int(at) and (not rank or int(rank) == _rank()):
        os.kill(os.getpid(), signal.SIGTERM)


def poison_loss(loss: torch.Tensor, step: int) -> torch.Tensor:
    """``nan:A-B`` / ``nan:A+``: NaN loss on rank 0 for those steps."""
    value = _spec("nan")
    if value is None or _rank() != 0:
        return loss
    if value.endswith("+"):
        hit = step >= int(value[:-1])
    else:
        lo, _, hi = value.partition("-")
        hit = int(lo) <= step <= int(hi or lo)
    return loss * float("nan") if hit else loss
