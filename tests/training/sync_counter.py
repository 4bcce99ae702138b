"""Counts the trainer's own host reads and collectives per step, from outside the trainer.

``count_trainer_syncs(argv)`` runs ``htmuon_dist.training.loop.run`` in this process with
``torch.distributed``'s collectives and ``Tensor.item/tolist/__float__/__int__/__bool__``
patched. A call counts when the frame that makes it lies in ``htmuon_dist/training/`` (the
trainer's own code: the model's FSDP collectives, gradient clipping's norm reduction inside
torch and the optimizer's step are not the trainer's and are tested elsewhere). Each call is
charged to the step whose ``train_step`` last started, from there until the next one; calls
before the first step (set-up) or after ``train`` returns (export, summary) are not charged.
"""

from __future__ import annotations

import collections
import sys
from typing import Any

import torch
import torch.distributed as dist

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
               "broadcast_object_list", "barrier", "reduce", "reduce_scatter_tensor", "all_to_all",
               "all_to_all_single", "gather", "scatter", "monitored_barrier")
HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__")
TRAINER_DIR = "/htmuon_dist/training/"


def count_trainer_syncs(argv: list[str]) -> dict[str, Any]:
    """Runs the trainer on ``argv`` (this process's rank); returns ``{"per_step": {step:
    {"collective:all_reduce": n, "read:item": n, ...}}, "summary": run's summary}``."""
    from htmuon_dist.training import loop
    from htmuon_dist.training.config import parse_args

    per_step: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    state = {"step": None}

    def charge(kind: str) -> None:
        caller = sys._getframe(2).f_code.co_filename
        if state["step"] is not None and TRAINER_DIR in caller.replace("\\", "/"):
            per_step[state["step"]][kind] += 1

    saved: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, wrapper_of) -> None:
        original = getattr(owner, name)
        saved.append((owner, name, original))
        setattr(owner, name, wrapper_of(original))

    def collective(name: str):
        def wrap(fn):
            def counted(*args, **kwargs):
                charge(f"collective:{name}")
                return fn(*args, **kwargs)
            return counted
        return wrap

    def read(name: str):
        def wrap(fn):
            def counted(self, *args, **kwargs):
                charge(f"read:{name}")
                return fn(self, *args, **kwargs)
            return counted
        return wrap

    for name in COLLECTIVES:
        if hasattr(dist, name):
            patch(dist, name, collective(name))
    for name in HOST_READS:
        patch(torch.Tensor, name, read(name))

    def train_step_wrap(fn):
        def wrapped(rt, built, batches, step):
            state["step"] = step
            return fn(rt, built, batches, step)
        return wrapped

    def train_wrap(fn):
        def wrapped(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            finally:
                state["step"] = None
        return wrapped

    patch(loop, "train_step", train_step_wrap)
    patch(loop, "train", train_wrap)
    try:
        summary = loop.run(parse_args(argv))
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)
    return {"per_step": {s: dict(c) for s, c in sorted(per_step.items())}, "summary": summary}
