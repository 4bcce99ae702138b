"""``htmuon-train`` / ``launch/train.py``: parse arguments, run, turn config errors into one line.

Exit status: 0 done (or stopped at ``--stop_at_step``); 2 configuration error (one line
``htmuon-train: configuration error: ...``, no traceback); 75 pre-empted (a signal from
``--preempt_signals`` arrived; the step in flight finished and was checkpointed; rerun to
resume); 1 anything else, including a lost peer (the traceback, then one line naming this rank).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from .common import ConfigError

PREFIX = "htmuon-train"


def _rank() -> str:
    return os.environ.get("RANK", "0")


# What torch 2.13's gloo transport says when a peer process died or stopped answering; gloo
# raises these as plain RuntimeErrors (NCCL and the rendezvous store raise DistError subclasses).
_GLOO_LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                   "Timed out waiting")


def _lost_peer(e: BaseException) -> bool:
    """A collective failed because another rank died, hung past the timeout, or vanished.

    Only torch.distributed's backend/network/store errors and gloo's transport errors count; any
    other RuntimeError (one that merely mentions NCCL, gloo or a ProcessGroup, e.g. a bug in
    this library) is not a lost peer and propagates with its traceback.
    """
    import torch.distributed as dist

    lost_types = tuple(getattr(dist, name) for name in ("DistBackendError", "DistNetworkError", "DistStoreError")
                       if hasattr(dist, name))
    if isinstance(e, lost_types):
        return True
    text = str(e)
    return type(e) is RuntimeError and any(k in text for k in _GLOO_LOST_PEER)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the process exit code (see the module doc).

    A distributed run ends with ``os._exit`` right after ``destroy_process_group``: FSDP,
    DeviceMesh and the optimizer still reference the gloo/NCCL groups, so their C++ objects (and
    worker threads) would otherwise be destroyed during interpreter shutdown, which aborted
    about one CPU run in ten at exit ("terminate called without an active exception", exit
    -6) after everything had been written. Every file is closed by then.
    """
    import torch.distributed as dist

    try:
        code = _main(argv)
    finally:  # also when _main raises: the traceback follows, and the normal exit
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            dist.destroy_process_group()
    if distributed:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _main(argv: Optional[Sequence[str]]) -> int:
    from .preemption import PREEMPTED_EXIT, PREEMPTED_MARKER, PreemptionWatch

    started, timeout_s = False, "?"
    try:
        from .config import parse_args
        from .preflight import NoGPUError, check_devices
        from .validate import preflight

        cfg = parse_args(argv)
        preflight(cfg)
        try:
            check_devices(cfg.train.allow_cpu)  # a GPU config without a GPU stops here, in seconds
        except NoGPUError as e:
            # Every process of a node sees the same devices: its first one speaks for the node.
            if os.environ.get("LOCAL_RANK", "0") == "0":
                print(f"{PREFIX}: error: {e}", file=sys.stderr, flush=True)
            return 2
        timeout_s = str(cfg.train.dist_timeout_s)
        # Installed before the (slow) process-group set-up: a signal then is not lost either.
        watch = PreemptionWatch.install(cfg.train.preempt_signals)
        started = True
        from .loop import run

        marker = Path(cfg.train.output_dir) / PREEMPTED_MARKER
        if _rank() == "0" and marker.exists():
            marker.unlink()
        summary = run(cfg, watch)
        if summary.get("preempted_by"):  # the loop wrote the marker before any rank could exit
            return PREEMPTED_EXIT
    except ConfigError as e:
        # Before training starts every rank sees the same error: rank 0 speaks for all.
        if _rank() == "0" or started:
            print(f"{PREFIX}: configuration error: {e}", file=sys.stderr, flush=True)
        return 2
    except Exception as e:
        if _lost_peer(e):
            import traceback

            traceback.print_exc()  # where it was waiting; the summary line comes last
            print(f"{PREFIX}: rank {_rank()}: lost contact with the other ranks ({type(e).__name__}: "
                  f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}); another rank died or stopped "
                  f"calling collectives (the process-group timeout is --dist_timeout_s {timeout_s} s). "
                  f"The launcher's log names the rank that failed first; rerun to resume from the last checkpoint",
                  file=sys.stderr, flush=True)
            os._exit(1)  # destroy_process_group could block on the dead peer
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
