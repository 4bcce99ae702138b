"""benchmarks/compare.py's summary: best lr per optimizer, diverged seeds, and the verdict."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

spec = importlib.util.spec_from_file_location("compare", Path(__file__).resolve().parent.parent / "benchmarks" / "compare.py")
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)


def _runs(table):
    """{(opt, lr): [ppl per seed]} -> run records."""
    return [{"optimizer": o, "lr": lr, "seed": s, "eval_ppl": p, "loss": [], "alpha": []}
            for (o, lr), ppls in table.items() for s, p in enumerate(ppls)]


GRIDS = {"htmuon": [0.05, 0.1], "muon": [0.02, 0.04]}


def test_best_lr_skips_diverged_and_verdict_says_yes():
    runs = _runs({("htmuon", 0.05): [100.0, 101.0, 102.0], ("htmuon", 0.1): [90.0, math.inf, 91.0],
                  ("muon", 0.02): [110.0, 111.5, 112.0], ("muon", 0.04): [120.0, 121.0, 119.0]})
    summary = compare.summarise(runs, GRIDS)
    best = summary["best"]
    assert best["htmuon"]["lr"] == 0.05  # 0.1 diverged on one seed: not eligible
    assert best["muon"]["lr"] == 0.02 and best["muon"]["edge"]
    assert best["htmuon"]["mean"] == 101.0 and abs(best["htmuon"]["std"] - 1.0) < 1e-12
    text = compare.verdict(runs, best)
    assert text.startswith("**Yes: htmuon beats muon") and "+10.17" in text and "lower on 3 of 3" in text


def test_verdict_no_measurable_difference():
    runs = _runs({("htmuon", 0.05): [100.0, 104.0, 99.0], ("htmuon", 0.1): [200.0] * 3,
                  ("muon", 0.02): [101.0, 100.0, 103.0], ("muon", 0.04): [300.0] * 3})
    text = compare.verdict(runs, compare.summarise(runs, GRIDS)["best"])
    assert text.startswith("**No measurable difference")


def test_lr_grid_defaults_and_errors():
    args, extra = compare.parse_args(["--lrs", "muon=0.01,0.02", "--unknown_trainer_flag", "1"])
    assert extra == ["--unknown_trainer_flag", "1"]
    grids = compare.lr_grids(args, ["htmuon", "muon"])
    assert grids["muon"] == [0.01, 0.02] and grids["htmuon"] == [0.025, 0.05, 0.1, 0.2]  # tiny: 0.05 x factors


def test_scripts_answer_help():
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    for script in ("benchmarks/compare.py", "benchmarks/esd_cost.py"):
        res = subprocess.run([sys.executable, script, "--help"], cwd=root, capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(root)})
        assert res.returncode == 0 and "usage:" in res.stdout, (script, res.stderr[-1000:])
