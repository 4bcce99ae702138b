"""``htmuon-diagnose`` / ``python -m htmuon_dist.diagnostics`` on a tiny LLaMA exported with
save_pretrained (safetensors), one file and sharded; one-line errors for bad paths."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from htmuon_dist.diagnostics import spectral_stats
from htmuon_dist.diagnostics.cli import main
from tiny_llama import tiny_llama

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_llama(seed=1, layers=2)
    one = tmp_path_factory.mktemp("model")
    model.save_pretrained(one, safe_serialization=True)
    sharded = tmp_path_factory.mktemp("sharded")
    model.save_pretrained(sharded, safe_serialization=True, max_shard_size="40KB")
    weights = {n: p.detach() for n, p in model.named_parameters() if p.dim() >= 2}
    return one, sharded, weights


@pytest.mark.parametrize("which", ["one", "sharded"])
def test_table_json_and_png(saved, which, tmp_path, capsys):
    one, sharded, weights = saved
    path = one if which == "one" else sharded
    if which == "sharded":
        assert len(list(path.glob("*.safetensors"))) > 1
    png, js = tmp_path / "esd.png", tmp_path / "esd.json"
    assert main([str(path), "--png", str(png), "--json", str(js), "--plot_layers", r"layers\.1\.mlp"]) == 0
    out = capsys.readouterr().out
    rows = json.loads(js.read_text())["matrices"]
    assert {r["name"] for r in rows} == set(weights)  # every >= 2-D weight, nothing else
    for r in rows:
        want = spectral_stats(weights[r["name"]])
        assert r["alpha"] == pytest.approx(want.alpha, rel=1e-9)
        assert r["stable_rank"] == pytest.approx(want.stable_rank, rel=1e-9)
        assert f"{r['alpha']:.2f}" in out
    names = [r["name"] for r in rows]
    assert names.index("model.layers.0.mlp.up_proj.weight") < names.index("model.layers.1.mlp.up_proj.weight")
    assert "mean alpha of the 14 hidden matrices" in out
    assert "ESD plot (3 matrices)" in out and png.stat().st_size > 10_000


def test_match_filters(saved, tmp_path, capsys):
    one, _, _ = saved
    js = tmp_path / "q.json"
    assert main([str(one), "--match", r"q_proj", "--png", "none", "--json", str(js)]) == 0
    rows = json.loads(js.read_text())["matrices"]
    assert len(rows) == 2 and all("q_proj" in r["name"] and math.isfinite(r["alpha"]) for r in rows)


def test_errors_are_one_line(saved, tmp_path, capsys):
    one, _, _ = saved
    cases = [
        ([str(tmp_path / "missing")], "no such file or directory"),
        ([str(tmp_path)], "no *.safetensors files"),
        ([str(one / "config.json")], "not a .safetensors file"),
        ([str(one), "--match", "nothing_matches_this"], "no >= 2-D weights match"),
        ([str(one), "--match", "("], "bad regular expression"),
    ]
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and err.startswith("htmuon-diagnose: "), err
    assert "safe_serialization=True" in (main([str(tmp_path)]), capsys.readouterr().err)[1]
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a safetensors file")
    assert main([str(bad)]) == 2
    assert "cannot read it as safetensors" in capsys.readouterr().err


def test_module_help():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-m", "htmuon_dist.diagnostics", "--help"], capture_output=True, text=True, env=env)
    assert res.returncode == 0 and "usage: htmuon-diagnose" in res.stdout and "--plot_layers" in res.stdout
