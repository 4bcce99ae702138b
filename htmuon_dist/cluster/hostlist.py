"""Expand SLURM compressed host lists (``node[01-03,07]``, ``gpu-a[1-2]-b[3-4],login1``).

SLURM writes node lists as comma-separated items; each item is text with optional bracket
groups holding comma-separated numbers or ``lo-hi`` ranges. A range keeps the zero padding of
its lower bound (``[08-10]`` -> 08, 09, 10). Several bracket groups in one item expand as a
product, leftmost varying slowest. ``scontrol show hostnames`` does the same; it is used only
as a fallback for syntax this parser rejects, so the result does not depend on whether the
SLURM client tools are installed where the entrypoint runs (e.g. inside a container).
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
from typing import Optional


def _split_top_level(text: str) -> list[str]:
    """Splits on commas outside brackets; raises on unbalanced brackets."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested '[' at position {i}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"']' without '[' at position {i}")
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError("'[' without ']'")
    items.append(text[start:])
    return items


def _expand_group(body: str) -> list[str]:
    """``01-03,07`` -> ['01', '02', '03', '07']."""
    out: list[str] = []
    for part in body.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"bad range '{part}' (expected N or N-M with digits)")
        if not sep:
            out.append(lo)
            continue
        a, b = int(lo), int(hi)
        if b < a:
            raise ValueError(f"range '{part}' runs backwards")
        # SLURM pads to the lower bound's width only when it was written with a leading zero.
        width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
        out.extend(str(n).zfill(width) for n in range(a, b + 1))
    return out


def _expand_item(item: str) -> list[str]:
    pieces: list[list[str]] = []
    rest = item
    while rest:
        open_at = rest.find("[")
        if open_at < 0:
            pieces.append([rest])
            break
        close_at = rest.index("]", open_at)
        if open_at:
            pieces.append([rest[:open_at]])
        pieces.append(_expand_group(rest[open_at + 1 : close_at]))
        rest = rest[close_at + 1 :]
    return ["".join(p) for p in itertools.product(*pieces)]


def expand_hostlist(text: str, scontrol: Optional[str] = "auto") -> list[str]:
    """All host names of a SLURM node list, in SLURM's order.

    ``scontrol``: ``"auto"`` falls back to ``scontrol show hostnames`` (if on PATH) when the
    built-in parser rejects the syntax; ``None`` never calls it; a path uses that binary.
    Raises ``ValueError`` naming the problem when the list cannot be expanded.
    """
    text = text.strip()
    if not text:
        raise ValueError("empty node list")
    try:
        hosts = [h for item in _split_top_level(text) if item.strip() for h in _expand_item(item.strip())]
        if not hosts:
            raise ValueError("no host names")
        return hosts
    except ValueError as exc:
        binary = shutil.which("scontrol") if scontrol == "auto" else scontrol
        if not binary:
            raise ValueError(f"cannot expand node list '{text}': {exc}") from None
        proc = subprocess.run([binary, "show", "hostnames", text], capture_output=True, text=True, timeout=30)
        if proc.returncode != 0 or not proc.stdout.split():
            raise ValueError(f"cannot expand node list '{text}': {exc}; scontrol: {proc.stderr.strip()}") from None
        return proc.stdout.split()
