"""benchmarks/scaling.py at small size on the CPU (gloo, W = 1 and 2), and its --compare.

``pytest -m scaling`` selects these; on a multi-GPU runner run the suite itself
(``python benchmarks/scaling.py --device cuda``), which exits 1 when a W is not equivalent.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import scaling  # noqa: E402

pytestmark = [pytest.mark.scaling, pytest.mark.multirank]


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory) -> tuple[dict, str]:
    """One real run of the suite as a user starts it: W = 1, 2, FSDP2, 2 timed steps."""
    path = tmp_path_factory.mktemp("scaling") / "run.json"
    proc = subprocess.run([sys.executable, "benchmarks/scaling.py", "--device", "cpu", "--worlds", "1,2",
                           "--steps", "2", "--json", str(path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(path.read_text()), proc.stdout


def test_sharded_equals_single_process_at_every_world_size(cpu_run):
    report, stdout = cpu_run
    assert [r["world"] for r in report["results"]] == [1, 2]
    for r in report["results"]:
        assert r["ok"] and r["plans_agree"] and r["max_rel_err"] <= report["meta"]["tol"] == 1e-5
        assert r["backend_detected"] == "fsdp2"
        assert len(r["ranks"]) == r["world"]
        assert sum(p["owned"] for p in r["ranks"]) == r["matrices"] > 0
        assert all(p["step_s"] >= p["opt_step_s"] > 0 for p in r["ranks"])
        assert all(0 < p["spectral_s"] <= p["opt_step_s"] for p in r["ranks"] if p["owned"])
        assert r["balance"] >= 1.0
    assert "max rel err" in stdout and "yes" in stdout


def test_bytes_sent_follow_the_exchange_formula(cpu_run):
    report, _ = cpu_run
    one, two = report["results"]
    assert one["sent_bytes_total"] == 0  # one rank owns everything: nothing to send
    # FSDP2 row shards at W=2: summed over ranks, 2·(W-1)/W of all matrix bytes up to the uneven
    # split and the owner's own piece (the bound tests/test_distributed.py uses).
    import dist_models

    model = dist_models.build("llama")
    from htmuon_dist import param_groups

    matrix_bytes = sum(p.numel() * 4 for g in param_groups(model, "reference") if g.get("htmuon") for p in g["params"])
    assert 0.8 * matrix_bytes <= two["sent_bytes_total"] <= 2 * matrix_bytes
    assert all(p["sent_bytes"] > 0 for p in two["ranks"])


def test_compare_prints_ratios(cpu_run, tmp_path, capsys):
    report, _ = cpu_run
    old = json.loads(json.dumps(report))
    for r in old["results"]:  # an "old" run twice as slow, with half the bytes at W=2
        r["step_s_max"] *= 2
        r["spectral_s_max"] *= 2
        if r["world"] == 2:
            r["sent_bytes_total"] //= 2
    lines = scaling.compare(old, report)
    assert lines[0].split() == ["W", "step", "max", "Σ^p", "max", "bytes", "balance", "equal", "old/new"]
    assert lines[1].split() == ["1", "0.50", "0.50", "1.00", "1.00", "yes/yes"]
    assert lines[2].split()[:5] == ["2", "0.50", "0.50", "2.00", "1.00"]
    # Saved files compare without rerunning, and runs of different set-ups are flagged.
    old["meta"]["backend"] = "ddp"
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "new.json").write_text(json.dumps(report))
    assert scaling.main(["--compare", str(tmp_path / "old.json"), "--against", str(tmp_path / "new.json")]) == 0
    out = capsys.readouterr().out
    assert "warning: the runs differ in backend: ddp -> fsdp2" in out
    assert "2.00" in out


def test_a_failed_equivalence_fails_the_run(cpu_run, tmp_path, capsys):
    report, _ = cpu_run
    bad = json.loads(json.dumps(report))
    bad["results"][1]["ok"] = False
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    assert scaling.main(["--compare", str(tmp_path / "bad.json"), "--against", str(tmp_path / "bad.json")]) == 1
    assert "NO/NO" in capsys.readouterr().out


def test_max_rel_err_sees_a_perturbed_parameter():
    import torch

    want = {"a": torch.ones(3, 3), "b": torch.ones(2)}
    assert scaling.max_rel_err({k: v.clone() for k, v in want.items()}, want) == 0.0
    got = {"a": torch.ones(3, 3), "b": torch.tensor([1.0, 1.0 + 1e-3])}
    assert scaling.max_rel_err(got, want) == pytest.approx(1e-3 / 2 ** 0.5, rel=1e-3)
    assert scaling.max_rel_err({"a": want["a"]}, want) == float("inf")


def test_cpu_world_sizes_are_capped():
    with pytest.raises(SystemExit):
        scaling.parse_args(["--device", "cpu", "--worlds", "1,8"])
