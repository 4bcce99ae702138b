"""``--optimizer htmuon_stream`` end to end: FSDP2 at 2 CPU processes trains, logs the basis's
error estimate, and a run stopped and resumed from its checkpoint (the warm basis saved with
torch.distributed.checkpoint as optimizer state) repeats the uninterrupted run's losses."""

from __future__ import annotations

import json

import pytest

from conftest import TINY, launch, metrics

pytestmark = [pytest.mark.multirank, pytest.mark.slow]
STEPS = 6


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_htmuon_stream_trains_logs_its_error_and_resumes_exactly(cache_dir, tmp_path_factory):
    full_dir, resumed_dir = tmp_path_factory.mktemp("stream_full"), tmp_path_factory.mktemp("stream_resumed")
    args = [*TINY, "--optimizer", "htmuon_stream", "--max_steps", str(STEPS), "--save_steps", "100"]
    launch(cache_dir, "cpu_fsdp2.yaml", [*args, "--output_dir", str(full_dir)])
    launch(cache_dir, "cpu_fsdp2.yaml", [*args, "--output_dir", str(resumed_dir), "--stop_at_step", "3"])
    launch(cache_dir, "cpu_fsdp2.yaml", [*args, "--output_dir", str(resumed_dir)])
    full, _ = metrics(full_dir)
    resumed, _ = metrics(resumed_dir)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=1e-6), f"step {step}"
    assert full[STEPS] < full[1] - 0.3
    errors = [r["stream_error"] for r in _rows(full_dir) if "stream_error" in r]
    assert len(errors) == STEPS and all(0.0 <= e < 1.0 for e in errors)
    summary = json.loads((full_dir / "summary.json").read_text())
    assert summary["optimizer_class"] == "HTMuon"
