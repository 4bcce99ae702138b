"""``--esd_steps``: a 2-rank FSDP2 run writes the ESD rows (every matrix, each computed on its
owner) to metrics.jsonl and TensorBoard and draws esd_alpha.png; htmuon-diagnose on the exported
model reproduces the last row."""

from __future__ import annotations

import json

from conftest import TINY, launch, metrics  # noqa: F401


def test_esd_steps_fsdp2_metrics_png_and_diagnose(cache_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = [*TINY, "--max_steps", "4", "--esd_steps", "2", "--save_steps", "0", "--plot", "true",
            "--report_to", "jsonl,tensorboard", "--output_dir", str(out)]
    proc = launch(cache_dir, "cpu_fsdp2.yaml", args)
    assert "alpha plot:" in proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    esd = [r for r in rows if "esd_alpha_mean" in r]
    assert [r["step"] for r in esd] == [2, 4]
    alphas = {k: v for k, v in esd[-1].items() if k.startswith("esd/") and k.endswith("/alpha")}
    assert len(alphas) == 4 * 7 + 2  # every hidden matrix of the tiny LLaMA, embedding and head
    assert all(isinstance(v, float) and v > 1 for v in alphas.values())
    for kind in ("q", "k", "v", "o", "gate", "up", "down"):
        assert f"esd_alpha/{kind}" in esd[-1]
    assert (out / "esd_alpha.png").stat().st_size > 10_000
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))

    from htmuon_dist.diagnostics.cli import main

    table = tmp_path / "diag.json"
    assert main([str(out / "final_model"), "--png", str(tmp_path / "esd.png"), "--json", str(table)]) == 0
    diag = {r["name"]: r["alpha"] for r in json.loads(table.read_text())["matrices"]}
    for key, value in alphas.items():
        name = "model." + key[len("esd/"):-len("/alpha")] + ".weight"
        name = name.replace("model.lm_head", "lm_head")
        assert diag[name] == value, name  # the exported weights are the ones measured at step 4


def test_train_help_lists_esd_steps():
    import os
    import subprocess
    import sys

    from conftest import REPO

    res = subprocess.run([sys.executable, "launch/train.py", "--help"], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "--esd_steps" in res.stdout
