"""The trainer's own host reads and collectives (tests/training/sync_counter.py counts them):
none on a step that is not a logging, evaluation, checkpoint or pre-emption-check step, on one
process and on FSDP2 x 2, with packed and with padded (``--packing false``) batches."""

from __future__ import annotations

import os

import pytest

from conftest import REPO, TINY

STEPS, LOG, CHECK = 8, 4, 4


def _argv(out: str, packing: bool) -> list[str]:
    argv = [a if a != "configs/train/tiny_cpu.yaml" else str(REPO / a) for a in TINY]
    i = argv.index("--logging_steps")
    argv[i + 1] = str(LOG)
    return [*argv, "--max_steps", str(STEPS), "--save_steps", "0", "--export_model", "false",
            "--preempt_check_steps", str(CHECK), "--packing", "true" if packing else "false",
            "--output_dir", out]


def _worker(rank: int, world: int, cache: str, out: str, packing: bool, parallel: str) -> dict:
    os.environ.update(HTMUON_CACHE=cache, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    os.environ.pop("ACCELERATE_USE_FSDP", None)
    from sync_counter import count_trainer_syncs

    return count_trainer_syncs([*_argv(out, packing), "--parallel", parallel])["per_step"]


def _quiet_steps() -> list[int]:
    return [s for s in range(1, STEPS + 1) if s % LOG and s % CHECK and s != STEPS]


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_no_trainer_sync_between_logging_steps_one_process(cache_dir, tmp_path, packing):
    os.environ["HTMUON_CACHE"] = str(cache_dir)
    from sync_counter import count_trainer_syncs

    per_step = count_trainer_syncs([*_argv(str(tmp_path), packing), "--parallel", "none"])["per_step"]
    busy = {s: per_step[s] for s in _quiet_steps() if per_step.get(s)}
    assert not busy, f"host reads/collectives of the trainer on quiet steps: {busy}"
    assert per_step.get(LOG), "the harness saw nothing at the logging step: it counts nothing"


@pytest.mark.multirank
@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_no_trainer_sync_between_logging_steps_fsdp2(cache_dir, tmp_path, packing):
    from multirank import run_ranks

    results = run_ranks(_worker, 2, str(cache_dir), str(tmp_path), packing, "fsdp2", timeout=600, pg_timeout=120)
    for rank, per_step in enumerate(results):
        busy = {s: per_step[s] for s in _quiet_steps() if per_step.get(s)}
        assert not busy, f"rank {rank}: host reads/collectives of the trainer on quiet steps: {busy}"
        assert any(k.startswith("collective:") for k in per_step.get(LOG, {})), per_step
