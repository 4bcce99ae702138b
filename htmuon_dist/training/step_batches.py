"""The micro-batches of the coming optimizer steps, drawn a window ahead with their token counts.

The loss of a step is the mean over all target tokens of the step on all ranks, so every rank
needs the step's global target count before its backward. Packed batches have the same count
on every rank (``local * world``); padded ones (``--packing false``) do not, and asking for the
sum every step put an all-reduce and a host read into every step. :class:`StepBatches` draws
the batches of the next ``n`` steps at once (on the CPU, where the data loader leaves them),
counts their targets, and sums the counts of the whole window over the ranks in one
all-reduce. The loop refills it on pre-emption-check steps (``--preempt_check_steps``), which
already synchronise, so no other step has a host read or collective of the trainer's own.

Checkpoints stay exact: :meth:`state_dict` is the stream's state before the first step that has
not been trained on yet, so a resumed run draws the same batches as an uninterrupted one.
Memory: ``n * accum`` micro-batches of token ids (int64 ``input_ids``, ``labels`` and
``attention_mask``), e.g. 63 MB for 10 steps x 4 micro-batches of 64 x 1024 tokens.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

import torch


class StepBatches:
    """Every rank: ``refill(n)`` (collective with ``--packing false`` on several ranks), then one
    ``next_step()`` per optimizer step."""

    def __init__(self, stream: Any, accum: int, world: int, packed: bool,
                 sum_over_ranks: Callable[[list[float]], list[float]]) -> None:
        self.stream, self.accum, self.world, self.packed = stream, accum, world, packed
        self.sum_over_ranks = sum_over_ranks
        self._batches = iter(stream)
        # (the step's micro-batches, its global target count, the stream's state before them)
        self._queue: deque[tuple[list[dict[str, torch.Tensor]], int, dict[str, Any]]] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def refill(self, n: int) -> None:
        """Draws the batches of ``n`` more steps; with padded batches on several ranks one
        all-reduce sums their target counts (every rank must call it with the same ``n``)."""
        drawn, local = [], []
        for _ in range(n):
            state = self.stream.state_dict()
            micro = [next(self._batches) for _ in range(self.accum)]
            drawn.append((micro, state))
            local.append(sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro))
        if self.packed or self.world == 1:
            totals = [count * self.world for count in local]
        else:
            totals = [int(round(x)) for x in self.sum_over_ranks([float(c) for c in local])] if local else []
        for (micro, state), total in zip(drawn, totals):
            self._queue.append((micro, total, state))

    def next_step(self) -> tuple[list[dict[str, torch.Tensor]], int]:
        """The next step's ``accum`` micro-batches and its target count over all ranks."""
        if not self._queue:
            raise RuntimeError("StepBatches.next_step() with no step drawn: call refill() first (a loop bug)")
        micro, total, _ = self._queue.popleft()
        return micro, total

    def state_dict(self) -> dict[str, Any]:
        """The stream's state before the first step not yet returned by :meth:`next_step`."""
        return self._queue[0][2] if self._queue else self.stream.state_dict()
