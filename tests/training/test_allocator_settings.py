"""--malloc_mmap_threshold: the auto rule and bad values (training/memory.py; the measured
effect on the peak is in benchmarks/results/memory_cpu.txt)."""

from __future__ import annotations

import pytest

from htmuon_dist.training.config import TrainArguments
from htmuon_dist.training.memory import mmap_threshold_for, set_mmap_threshold


def test_auto_is_one_mib_from_100m_parameters_and_glibc_default_below():
    assert TrainArguments().malloc_mmap_threshold == -1
    assert mmap_threshold_for(-1, 368_000_000) == 1 << 20  # LLaMA-350M
    assert mmap_threshold_for(-1, 100_000_000) == 1 << 20
    assert mmap_threshold_for(-1, 99_999_999) == 0
    assert mmap_threshold_for(-1, 1_900_000) == 0  # the tiny demo: no page faults added
    assert mmap_threshold_for(0, 368_000_000) == 0
    assert mmap_threshold_for(4096, 10) == 4096


def test_bad_threshold_names_the_option():
    with pytest.raises(ValueError, match="--malloc_mmap_threshold"):
        mmap_threshold_for(-2, 10)


def test_zero_sets_nothing():
    assert set_mmap_threshold(0) is False
