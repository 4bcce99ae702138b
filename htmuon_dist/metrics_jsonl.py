"""The ``metrics.jsonl`` format, read back: one JSON object per line, written by the trainer
(``training.metrics.MetricsWriter``) and read by the trainer (resume), the diagnostics plots
and the benchmarks. It sits below both ``training`` and ``diagnostics`` so that neither needs
to import the other to read it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl (a torn last line from a crash is ignored); [] if absent."""
    rows = []
    if not Path(path).exists():
        return rows
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
