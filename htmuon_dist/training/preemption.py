"""Pre-emption and the process-group timeout.

Clusters warn before they kill: SLURM sends SIGTERM (``scancel``, pre-emption, the time limit)
or a chosen signal ahead of time (``#SBATCH --signal=USR1@120``); Kubernetes sends SIGTERM and
waits ``terminationGracePeriodSeconds``. :class:`PreemptionWatch` turns those signals into a
flag. A distributed run checks it every ``--preempt_check_steps`` steps (default 10) and after
the last: all ranks agree (one all-reduce of a scalar, the only host synchronisation the loop
adds between logging steps), every rank checkpoints that step, and the process exits with
:data:`PREEMPTED_EXIT`; so a signal stops the run within that many steps. One process reads
its flag after every step (no collective).
Rank 0 also writes ``output_dir/PREEMPTED`` (the SLURM script requeues when it exists).

A signal handler only records the signal: the step in flight finishes normally, so no
completed step is lost and the resumed run is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from .common import ConfigError

# EX_TEMPFAIL from sysexits.h: "try again later", the usual meaning of a pre-empted job.
PREEMPTED_EXIT = 75
PREEMPTED_MARKER = "PREEMPTED"


def parse_signals(spec: str) -> list[signal.Signals]:
    """``"SIGTERM,USR1"`` -> signals; ``none`` or empty -> []."""
    out: list[signal.Signals] = []
    for raw in (s.strip() for s in (spec or "").split(",")):
        if not raw or raw.lower() == "none":
            continue
        name = raw.upper() if raw.upper().startswith("SIG") else "SIG" + raw.upper()
        sig = signal.Signals.__members__.get(name)
        if sig is None or sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ConfigError(f"--preempt_signals: {raw!r} is not a signal that can be caught; use e.g. SIGTERM,SIGUSR1 or none")
        out.append(sig)
    return out


class PreemptionWatch:
    """Records the first pre-emption signal this process receives (see the module doc)."""

    def __init__(self, signals: list[signal.Signals]) -> None:
        self.signals = signals
        self.received: Optional[str] = None

    @classmethod
    def install(cls, spec: str) -> "PreemptionWatch":
        """Handlers for the signals in ``spec`` (``--preempt_signals``); Python allows them only in
        the main thread, elsewhere the watch stays inert."""
        watch = cls(parse_signals(spec))
        if threading.current_thread() is threading.main_thread():
            for sig in watch.signals:
                signal.signal(sig, watch._handler)
        else:
            watch.signals = []
        return watch

    def _handler(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name

    def disarm(self) -> None:
        """Ignores the watched signals from now on: after the pre-emption checkpoint the launcher
        forwards SIGTERM to ranks that are still exiting (one rank's exit makes it stop the
        others), and that must not turn their status 75 into death by signal. Handlers set to
        SIG_IGN survive interpreter shutdown, unlike Python handlers."""
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                signal.signal(sig, signal.SIG_IGN)

    def agreed(self, device: torch.device) -> Optional[str]:
        """The signal seen by any rank (collective when distributed and signals are watched).
        Every rank must call it after the same step."""
        if not self.signals:
            return None
        code = signal.Signals[self.received].value if self.received else 0
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([code], dtype=torch.int64, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            code = int(t.item())
        return signal.Signals(code).name if code else None


def write_marker(output_dir: Path, step: int, signal_name: str) -> None:
    """Rank 0: ``output_dir/PREEMPTED`` = ``{"step", "signal", "time"}`` (fsync'd)."""
    path = Path(output_dir) / PREEMPTED_MARKER
    with open(path, "w") as f:
        f.write(json.dumps({"step": step, "signal": signal_name, "time": time.time()}) + "\n")
        f.flush()
        os.fsync(f.fileno())


def process_group_kwargs(timeout_s: int, backend: Optional[str] = None) -> list:
    """Accelerate handlers that set the process-group timeout (and ``backend``, None: the
    device's default); Accelerate passes them to ``torch.distributed.init_process_group`` and
    to ``deepspeed.init_distributed`` alike."""
    from accelerate.utils import InitProcessGroupKwargs

    return [InitProcessGroupKwargs(backend=backend, timeout=datetime.timedelta(seconds=int(timeout_s)))]
