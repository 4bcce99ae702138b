"""Non-finite gradients without host reads: the device-side flag of one step and the skip
counts that are read only at a check (GradScaler's found-inf pattern).

Every rank computes its own flag; the exchange agrees on it (distributed/engine.py). Counts
are float32 on the device; :class:`SkipCounter` reads them at ``check_every`` steps only.
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch


def nonfinite_flag(grads: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.device]]:
    """Whether any of ``grads`` holds a NaN/Inf, as a 0-d bool tensor left on the device (no
    host synchronisation), the per-tensor "all finite" flags (bool, (len(grads),)), and that
    device (None for an empty list).

    One ``_foreach_norm(inf)`` over the list (the largest magnitude of each tensor: NaN or Inf
    exactly when the tensor holds one, and unlike the 2-norm it cannot overflow)."""
    if not grads:
        none = torch.zeros((), dtype=torch.bool)
        return none, none.reshape(1), None
    device = grads[0].device
    peaks = torch._foreach_norm(list(grads), float("inf"))
    if any(t.device != device or t.dtype != peaks[0].dtype for t in peaks):
        peaks = [t.to(device=device, dtype=torch.float32) for t in peaks]
    ok = torch.isfinite(torch.stack(peaks))
    return ~ok.all(), ok, device


class SkipCounter:
    """Skipped steps on the device: (total, current run, longest run since the last check),
    float32 (3,), updated every step without a host read and read at a check."""

    def __init__(self) -> None:
        self.counts: Optional[torch.Tensor] = None
        self.seen = 0  # the total at the last check (host-side)

    def count(self, keep: torch.Tensor) -> None:
        """Adds one step: ``keep`` is the step's 0-d gate (1.0 stepped, 0.0 skipped)."""
        skipped = 1.0 - keep.to(torch.float32)
        if self.counts is None or self.counts.device != skipped.device:
            self.counts = torch.zeros(3, dtype=torch.float32, device=skipped.device)
        total, run, longest = self.counts.unbind()
        total.add_(skipped)
        run.mul_(skipped).add_(skipped)
        torch.maximum(longest, run, out=longest)

    def read(self) -> tuple[int, int, int]:
        """(skipped steps, current run, longest run since the last check): a host read."""
        if self.counts is None:
            return 0, 0, 0
        total, run, longest = (int(x) for x in self.counts.tolist())
        return total, run, longest

    def check(self, names: Sequence[str], finite: torch.Tensor, nonfinite: str,
              patience: Optional[int]) -> None:
        """At a check: warn about the steps skipped since the last one, and raise
        ``FloatingPointError`` for ``nonfinite="raise"`` or when ``patience`` (not None) steps
        in a row were skipped. ``names``/``finite`` are this step's gradients and their flags."""
        total, run, longest = self.read()
        new = total - self.seen
        self.seen = total
        if self.counts is not None:
            self.counts[2].copy_(self.counts[1])  # the longest run restarts from the current one
        if not new:
            return
        bad = [n for n, ok in zip(names, finite.tolist()) if not ok] if run else []
        where = ", ".join(bad) if bad else "on another rank, or in an earlier step"
        if nonfinite == "raise":
            raise FloatingPointError(
                f"HTMuon: non-finite gradient ({where}); {new} step(s) since the last check "
                f"were skipped and nothing was updated. Lower the lr, clip gradients, or pass "
                f"nonfinite='skip' to skip such steps"
            )
        if patience is not None and longest >= patience:
            raise FloatingPointError(
                f"HTMuon: {longest} steps in a row had non-finite gradients "
                f"(last: {where}); the run is diverging rather than hitting a rare spike. Lower "
                f"the lr, clip gradients, or resume from an earlier checkpoint (nonfinite_patience="
                f"{patience})"
            )
        warnings.warn(f"HTMuon: skipped a step with non-finite gradients ({where}); "
                      f"{new} since the last check")
