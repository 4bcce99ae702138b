"""benchmarks/step_model.py: the owner balance, the time lookup and the printed table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import step_model  # noqa: E402


def test_owner_load_is_largest_first_and_floors_at_one_matrix():
    # largest first onto the least-loaded owner (LPT, as the planner): 3+2+2 | 3+2, not the optimum 6
    assert step_model.max_owner_load([3.0, 3.0, 2.0, 2.0, 2.0], 2) == 7.0
    assert step_model.max_owner_load([5.0, 1.0, 1.0], 1024) == 5.0


def test_matrix_time_prefers_measurements_then_scales_by_cost():
    p = step_model.Profile("t")
    p.add("eigh", 2048, 5461, 0.030)
    assert step_model.matrix_time(p, "eigh", 5461, 2048) == 0.030  # either orientation
    from htmuon_dist.spectral import method_cost

    want = 0.030 * method_cost("eigh", 11008, 4096) / method_cost("eigh", 5461, 2048)
    assert step_model.matrix_time(p, "eigh", 4096, 11008) == pytest.approx(want)
    probe = step_model.h100_probe()
    # composed: fp64 matmuls at 50 TFLOP/s + the probe's eigh64 at n = 4096 (126.9 ms)
    t = step_model.matrix_time(probe, "eigh", 4096, 4096)
    assert t == pytest.approx(126.9e-3 + 6 * 4096**3 / 50e12)


def test_table_from_a_gpu_report(tmp_path):
    rows = []
    for shape in [(2048, 2048), (5461, 2048), (4096, 4096), (11008, 4096)]:
        n = min(shape)
        rows += [{"shape": list(shape), "method": "ns5", "time_s": 1e-3 * (n / 2048) ** 3},
                 {"shape": list(shape), "method": "eigh", "time_s": 2e-3 * (n / 2048) ** 3},
                 {"shape": list(shape), "method": "gram32", "time_s": 1.5e-3 * (n / 2048) ** 3},
                 {"shape": list(shape), "method": "gram_rr", "time_s": 4e-3 * (n / 2048) ** 3},
                 {"shape": list(shape), "method": "tracked_ns", "time_s": 3e-3 * (n / 2048) ** 3}]
    report = tmp_path / "r.json"
    report.write_text(json.dumps({"device": "Fake GPU", "rows": rows}))
    out = tmp_path / "o.json"
    proc = subprocess.run([sys.executable, "benchmarks/step_model.py", "--gpu-report", str(report),
                           "--worlds", "8,1024", "--json", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "report " in proc.stdout and "Fake GPU" in proc.stdout
    assert "under 10% at W =" in proc.stdout and "MFU 0.4" in proc.stdout
    data = json.loads(out.read_text())
    r8 = next(r for r in data["rows"] if r["model"] == "7b" and r["W"] == 8)
    # 7B at W = 8: 224 matrices, 28 per owner; eigh costs 2x NS5 in this report, so the
    # Σ^p parts keep that ratio (the exchange and elementwise parts are shared)
    eigh, ns5 = r8["methods"]["htmuon eigh"]["spectral_s"], r8["methods"]["muon ns5"]["spectral_s"]
    assert eigh == pytest.approx(2 * ns5)
    assert r8["methods"]["htmuon eigh"]["fraction"] == pytest.approx(
        r8["methods"]["htmuon eigh"]["step_s"] / r8["fwd_bwd_s"])


def test_probe_profile_prices_unmeasured_methods_with_gpu_cost():
    import gpu_cost

    import torch

    probe = step_model.h100_probe()
    assert step_model.PRICED_INPUT == "float32"  # the default --comm-bytes 4: a float32 wire
    for method in ("tracked_ns", "polar_express", "gram_rr"):
        power = 0.0 if method == "polar_express" else 0.125
        want = max(gpu_cost.price(method, 4096, 11008, power, torch.float32),
                   gpu_cost.price(method, 11008, 4096, power, torch.float32))
        assert step_model.matrix_time(probe, method, 11008, 4096) == want
    # measured NS5 stays measured; Polar Express has NS5's products, so the same priced time
    assert step_model.matrix_time(probe, "ns5", 4096, 11008) == pytest.approx(6.919e-3)
    assert step_model.matrix_time(probe, "polar_express", 4096, 11008) == pytest.approx(6.919e-3)


def test_rows_carry_the_ratio_to_muons_step():
    args = step_model.argparse.Namespace(global_tokens=None, tokens_per_rank=16384, seq_len=2048, peak_tflops=989.0,
                                         mfu=0.4, intra_gbps=300.0, inter_gbps=45.0, comm_bytes=4, hbm_tbps=3.35,
                                         interval=5)
    r = step_model.step_times(step_model.h100_probe(), "1b", 64, args)
    assert r["methods"]["muon ns5"]["x_muon_step"] == 1.0
    eigh = r["methods"]["htmuon eigh"]
    assert eigh["x_muon_step"] == pytest.approx(eigh["step_s"] / r["methods"]["muon ns5"]["step_s"])
    assert "muon polar_express" in r["methods"]
