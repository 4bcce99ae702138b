"""Checks at the boundary, before any process group or model exists (``preflight``).
Filled in below."""

from __future__ import annotations


def preflight(cfg) -> None:
    return None
