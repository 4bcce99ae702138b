"""``htmuon-train`` / ``launch/train.py``: parse arguments, run, turn config errors into one line."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from .config import ConfigError, parse_args
from .preflight import NoGPUError, check_devices


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the process exit code (2 for a configuration error)."""
    try:
        cfg = parse_args(argv)
        check_devices(cfg.train.allow_cpu)  # a GPU config without a GPU stops here, in seconds
        from .loop import run

        run(cfg)
    except NoGPUError as e:
        print(f"htmuon-train: error: {e}", file=sys.stderr, flush=True)
        return 2
    except ConfigError as e:
        print(f"htmuon-train: configuration error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
