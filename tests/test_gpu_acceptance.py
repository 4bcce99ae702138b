"""benchmarks/gpu_acceptance.py: the dry run prints the plan anywhere; without CUDA a real run
stops at once; the report renders the key ratios from spectral rows."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_acceptance  # noqa: E402


def test_dry_run_prints_the_plan_and_exits_0():
    proc = subprocess.run([sys.executable, "benchmarks/gpu_acceptance.py", "--dry-run"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for name in ("fast_ns", "env", "spectral", "memory", "trainer", "deepspeed", "examples", "scaling"):
        assert f". {name} (timeout" in proc.stdout
    # the first section times fast_ns against NS5 at issue 19's shapes
    assert proc.stdout.index("1. fast_ns (timeout") < proc.stdout.index("2. env (timeout")
    assert "benchmarks/fast_ns_timing.py --device cuda" in proc.stdout
    assert "benchmarks/memory.py --layers 7b --world 1 --device cuda --json" in proc.stdout
    assert "deepspeed_zero1.yaml" in proc.stdout and "deepspeed_zero3.yaml" in proc.stdout
    assert "--stop_at_step 6" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_without_cuda_a_real_run_stops_at_once(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/gpu_acceptance.py", "--out", str(tmp_path / "r")],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no CUDA device is visible" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_sections_continue_after_a_failure(tmp_path):
    ok = gpu_acceptance.Section("a", "ok", [[sys.executable, "-c", "print('hi')"]], 30)
    bad = gpu_acceptance.Section("b", "fails", [[sys.executable, "-c", "import sys; sys.exit(3)"],
                                                [sys.executable, "-c", "print('never')"]], 30)
    slow = gpu_acceptance.Section("c", "times out", [[sys.executable, "-c", "import time; time.sleep(30)"]], 2)
    import time

    deadline = time.monotonic() + 60
    for s in (bad, slow, ok):
        gpu_acceptance.run_section(s, deadline, tmp_path / "log.txt", {})
    assert bad.result["status"] == "failed (rc 3)" and len(bad.result["runs"]) == 1
    assert slow.result["status"] == "timeout"
    assert ok.result["status"] == "ok" and ok.result["runs"][0]["stdout_tail"].strip() == "hi"


def test_report_quotes_the_key_ratios():
    rows = []
    for shape in gpu_acceptance.KEY_SHAPES:
        rows += [{"shape": list(shape), "method": "ns5", "time_s": 0.004, "ratio_to_ns5": 1.0, "err_over_bar": 6.0},
                 {"shape": list(shape), "method": "eigh", "time_s": 0.030, "ratio_to_ns5": 7.5, "err_over_bar": 1e-6},
                 {"shape": list(shape), "method": "tracked_ns", "time_s": 0.002, "ratio_to_ns5": 0.5, "err_over_bar": 2.0}]
    # rows of a run at p = 1/16 too (rows without a power are spectral.py's default, 1/8)
    rows += [{"shape": [2048, 2048], "power": 0.0625, "method": "log_ns", "time_s": 0.008, "ratio_to_ns5": 2.0,
              "err_over_bar": 1.8},
             {"shape": [2048, 2048], "power": 0.0625, "method": "eigh", "time_s": 0.030, "ratio_to_ns5": 7.5,
              "err_over_bar": 1e-6},
             {"shape": [2048, 2048], "power": 0.125, "method": "log_ns", "time_s": 0.008, "ratio_to_ns5": 2.0,
              "err_over_bar": 0.8}]
    sec = gpu_acceptance.Section("spectral", "x", [], 1, {"status": "ok", "seconds": 1, "data": {"rows": rows}})
    args = argparse.Namespace(out="o", quick=False)
    md = gpu_acceptance.markdown([sec], args, 10)
    # tracked_ns is faster but fails the bar here, so eigh is quoted
    assert "- 2048×5461, p = 0.125: fastest within the bar eigh 7.50× NS5; eigh 7.50×" in md
    assert "- 4096×11008, p = 0.125: fastest within the bar eigh 7.50× NS5" in md
    assert "- 4096×11008, p = 0.0625: not measured" in md
    # each power quotes its own run: log_ns met the bar at 1/8 only
    assert "- 2048×2048, p = 0.125: fastest within the bar log_ns 2.00× NS5; eigh 7.50×" in md
    assert "- 2048×2048, p = 0.0625: fastest within the bar eigh 7.50× NS5; eigh 7.50×" in md
    assert "| 2048×2048 | 0.0625 | log_ns | 8.00 | 2.00 | 1.80e+00 |" in md


def test_fast_ns_section_runs_on_the_cpu_and_renders(tmp_path):
    # the section's script, at 1/32 of the shapes on the CPU: every row it reports, priced too
    out = tmp_path / "fast_ns.json"
    proc = subprocess.run([sys.executable, "benchmarks/fast_ns_timing.py", "--device", "cpu", "--scale", "32",
                           "--repeat", "1", "--methods", "ns5,polar_express,eigh", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    import json

    data = json.loads(out.read_text())
    assert len(data["rows"]) == 5 * 3
    by = {(tuple(r["shape"]), r["method"]): r for r in data["rows"]}
    shape = (4096 // 32, 11008 // 32)
    assert by[(shape, "ns5")]["ratio_to_ns5"] == 1.0
    assert by[(shape, "eigh")]["err_over_gap"] < 0.01  # the exact method against its float64 twin
    assert 0.05 < by[(shape, "ns5")]["polar_err"] < 0.4 and by[(shape, "polar_express")]["polar_err"] < 0.15
    assert by[(shape, "eigh")]["priced_s"] > by[(shape, "ns5")]["priced_s"] > 0
    sec = gpu_acceptance.Section("fast_ns", "x", [], 1, {"status": "ok", "seconds": 1, "data": data})
    md = gpu_acceptance.markdown([sec], argparse.Namespace(out="o", quick=False), 10)
    assert "## Σ^p at issue 19's shapes" in md and f"| {shape[0]}×{shape[1]} | polar_express |" in md
