"""Returning freed heap memory to the OS in long runs.

glibc's malloc keeps freed blocks in its arenas: over thousands of steps (tokenizer batches,
Arrow rows, optimizer temporaries, checkpoint buffers) the resident size of a rank creeps up
although live memory does not (benchmarks/soak.py: +6.6% over 2,000 tiny FSDP2 steps; in a
single process, one ``malloc_trim`` gave back more than the growth). Calling ``malloc_trim(0)`` every few
hundred steps keeps RSS flat for a millisecond or so per call. A no-op where glibc is absent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Optional

_libc: Optional[ctypes.CDLL] = None
_checked = False


def malloc_trim() -> bool:
    """``malloc_trim(0)`` of glibc; True if memory was released, False if none or no glibc."""
    global _libc, _checked
    if not _checked:
        _checked = True
        name = ctypes.util.find_library("c")
        try:
            lib = ctypes.CDLL(name) if name else None
            _libc = lib if lib is not None and hasattr(lib, "malloc_trim") else None
        except OSError:
            _libc = None
    return bool(_libc.malloc_trim(0)) if _libc is not None else False
