"""Returning freed heap memory to the OS in long runs.

glibc's malloc keeps freed blocks in its arenas: over thousands of steps (tokenizer batches,
Arrow rows, optimizer temporaries, checkpoint buffers) the resident size of a rank creeps up
although live memory does not (benchmarks/soak.py: +6.6% over 2,000 tiny FSDP2 steps; in a
single process, one ``malloc_trim`` gave back more than the growth). Calling ``malloc_trim(0)`` every few
hundred steps keeps RSS flat for a millisecond or so per call. Large models also fix glibc's mmap
threshold (:func:`mmap_threshold_for`), so that freed tensors of 1 MiB or more leave the process
at once instead of raising its peak. Both are no-ops where glibc is absent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Optional

_libc: Optional[ctypes.CDLL] = None
_checked = False


def _lib() -> Optional[ctypes.CDLL]:
    """glibc (with malloc_trim and mallopt), or None."""
    global _libc, _checked
    if not _checked:
        _checked = True
        name = ctypes.util.find_library("c")
        try:
            lib = ctypes.CDLL(name) if name else None
            ok = lib is not None and hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt")
            _libc = lib if ok else None
        except OSError:
            _libc = None
    return _libc


def malloc_trim() -> bool:
    """``malloc_trim(0)`` of glibc; True if memory was released, False if none or no glibc."""
    lib = _lib()
    return bool(lib.malloc_trim(0)) if lib is not None else False


# glibc's mallopt parameter number of M_MMAP_THRESHOLD (malloc.h)
_M_MMAP_THRESHOLD = -3
AUTO_MMAP_THRESHOLD = 1 << 20
AUTO_MIN_PARAMS = 100_000_000


def mmap_threshold_for(setting: int, n_params: int) -> int:
    """The threshold ``--malloc_mmap_threshold setting`` means for a model of ``n_params``
    parameters: ``-1`` (auto) is 1 MiB from 100M parameters up and 0 (glibc's own) below;
    ``0`` keeps glibc's; ``n > 0`` is n bytes.

    Why: glibc raises its threshold on the fly up to 32 MiB, so after the first step every tensor
    below that comes from the heap, and the heap cannot shrink past a live block. A sharded
    step frees activations, unsharded layers and gradients around the optimizer state that
    outlives them, so the freed space stays resident: at LLaMA-350M on 2 CPU processes the
    peak RSS was ~0.8 GiB above the same run with a fixed 1 MiB threshold (every block of
    1 MiB or more is mmap-ed and goes back to the OS when freed). Small models gain nothing and
    would pay the page faults of their 16 MiB logits every step, hence 0 below 100M."""
    if setting < -1:
        raise ValueError(f"--malloc_mmap_threshold must be -1 (auto), 0 (glibc's default) or a byte count, got {setting}")
    if setting == -1:
        return AUTO_MMAP_THRESHOLD if n_params >= AUTO_MIN_PARAMS else 0
    return setting


def set_mmap_threshold(nbytes: int) -> bool:
    """Fixes glibc's mmap threshold at ``nbytes`` (which also stops its dynamic raising) for
    the allocations that follow; True if set, False for ``nbytes == 0`` or without glibc."""
    if nbytes <= 0:
        return False
    lib = _lib()
    return bool(lib is not None and lib.mallopt(_M_MMAP_THRESHOLD, int(nbytes)))
