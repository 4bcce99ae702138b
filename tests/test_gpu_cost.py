"""benchmarks/gpu_cost.py: the dispatch-mode counter counts products by operand dtype exactly,
NS5's count is its closed form, and the pricing follows the H100 probe it is calibrated on."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_cost  # noqa: E402


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_counter_counts_a_bmm_chain_by_dtype(device):
    a = torch.ones(3, 5, 7, device=device)
    b = torch.ones(3, 7, 4, device=device)
    c = torch.ones(4, 6, device=device, dtype=torch.float64)
    with gpu_cost.CostCounter(device=device) as counter:
        ab = torch.bmm(a, b)                       # 3*5*7*4 = 420 fp32 multiply-adds
        abh = torch.matmul(ab.to(torch.bfloat16), b.mT.to(torch.bfloat16))  # 3*5*4*7 = 420 bf16
        torch.baddbmm(ab, a, b)                    # another 420 fp32
        ab.double() @ c                            # (15, 4) @ (4, 6): 360 fp64
        torch.linalg.eigh(torch.eye(6, device=device, dtype=torch.float64) if device == "cpu"
                          else torch.empty(2, 6, 6, device=device))
    counts = counter.counts
    assert counts.macs[torch.float32] == 840
    assert counts.macs[torch.bfloat16] == 420
    assert counts.macs[torch.float64] == 360
    assert counts.flops() == 2 * (840 + 420 + 360)
    assert len(counts.decompositions) == 1 and counts.decompositions[0][0] == "eigh"
    assert abh.dtype == torch.bfloat16


def test_counter_ignores_other_devices():
    with gpu_cost.CostCounter(device="meta") as counter:
        torch.ones(4, 4) @ torch.ones(4, 4)  # host-side work (a schedule fitted on the CPU)
        torch.empty(4, 4, device="meta") @ torch.empty(4, 4, device="meta")
    assert dict(counter.counts.macs) == {torch.float32: 64}


def test_precision_mm_is_counted_with_its_operand_dtype_on_meta():
    from htmuon_dist.spectral.precision import mm

    with gpu_cost.CostCounter(device="meta") as counter:
        out = mm(torch.empty(2, 8, 16, device="meta"), torch.empty(2, 16, 4, device="meta"), torch.float16)
    assert out.dtype == torch.float32
    assert dict(counter.counts.macs) == {torch.float16: 2 * 8 * 16 * 4}


@pytest.mark.parametrize("m, n", [(5461, 2048), (2048, 5461), (300, 128)])
def test_ns5_count_is_its_closed_form(m, n):
    counts = gpu_cost.count("ns5", m, n)
    big, small = max(m, n), min(m, n)
    assert counts.where == "meta (full size)"
    assert counts.flops(torch.bfloat16) == 5 * (4 * big * small**2 + 2 * small**3)
    assert counts.flops() == counts.flops(torch.bfloat16) and not counts.decompositions


def test_cpu_counting_at_reduced_size_maps_dimensions_back():
    # stream has no meta kernel for geqrf: counted on the CPU at a smaller size, mapped back.
    # Its products: X V_prev, X^T Q1, X V, the Gram (X V)^T (X V) and X V (D V^T): five of
    # m n^2 multiply-adds each, plus two QRs (of an (m, n) and an (n, n) matrix) and their Q.
    m, n = 300, 100
    small = gpu_cost.count("stream", m, n, cpu_n=50)
    full = gpu_cost.count("stream", m, n, cpu_n=100)
    assert small.where.startswith("cpu at 150x50") and full.where.startswith("cpu at 300x100")
    assert small.macs[torch.float32] == full.macs[torch.float32] == 5 * m * n * n
    for counts in (small, full):
        qr = sorted(d[3] for d in counts.decompositions if d[0] == "qr")
        assert qr == [(1, n, n), (1, m, n)]
        assert sum(d[0] == "householder" for d in counts.decompositions) == 2


def test_prices_reproduce_the_probe():
    # bf16 NS5 is calibrated on the probe: priced == measured at the measured shapes
    for shape, ms in gpu_cost.NS5_MS.items():
        assert gpu_cost.price("ns5", *shape) == pytest.approx(ms * 1e-3)
    # eigh: float64 Gram + products at 50 TFLOP/s + the measured float64 eigh at n = 4096
    m, n = 11008, 4096
    want = (4 * m * n * n + 2 * n**3) / 50e12 + 126.9e-3  # Gram 2mn^2, V D V^T 2n^3, M K 2mn^2
    assert gpu_cost.price("eigh", m, n) == pytest.approx(want, rel=1e-9)
    # the rough ratio for eigh at 4096 x 4096 (~38x bf16 NS5; 39.2 with the float64 Gram
    # counted as the full product eigh's chunked baddbmm computes)
    assert 37 < gpu_cost.price("eigh", 4096, 4096) / gpu_cost.price("ns5", 4096, 4096) < 41


def test_decomposition_prices():
    # eigh at an unmeasured n scales by n^3 from the nearest measured one
    assert gpu_cost.eigh_seconds(torch.float64, 2500) == pytest.approx(27.9e-3 * (2500 / 2048) ** 3)
    assert gpu_cost.eigh_seconds(torch.float64, 3000) == pytest.approx(126.9e-3 * (3000 / 4096) ** 3)
    # a QR is priced at the rate the measured eigh reached: 9 n^3 / t_eigh
    n = 2048
    qr = gpu_cost.decomposition_seconds("qr", torch.float32, (n, n))
    assert qr == pytest.approx((2 * n**3 - 2 * n**3 / 3) / (9 * n**3 / 26.13e-3))


def test_input_dtype_sets_the_cutoff_and_so_the_step_count():
    # tracked_ns lifts from its input's noise floor: bf16 momentum needs fewer steps than float32
    bf16 = gpu_cost.count("tracked_ns", 1024, 512, input_dtype=torch.bfloat16)
    fp32 = gpu_cost.count("tracked_ns", 1024, 512, input_dtype=torch.float32)
    assert 0 < bf16.flops(torch.float32) < fp32.flops(torch.float32)
    # the figure for tracked_ns (float32 input): 46x bf16 NS5 at 4096 x 4096
    ratio = gpu_cost.price("tracked_ns", 4096, 4096, input_dtype=torch.float32) / gpu_cost.price("ns5", 4096, 4096)
    assert ratio == pytest.approx(46.3, abs=0.1)
    # NS5 casts to bf16 itself: its count does not depend on the input dtype
    assert gpu_cost.count("ns5", 300, 128, input_dtype=torch.float32).macs == gpu_cost.count("ns5", 300, 128).macs


def test_fast_ns_runs_on_16_bit_products_without_decompositions():
    # issue 19's contract for the new method, as the counter sees it at a 1B shape on meta
    from htmuon_dist.spectral import available_methods

    if "fast_ns" not in available_methods():
        pytest.skip("fast_ns is not registered")
    counts = gpu_cost.count("fast_ns", 5461, 2048)
    assert counts.where == "meta (full size)" and not counts.decompositions
    low = counts.flops(torch.float16) + counts.flops(torch.bfloat16)
    assert low > 0 and low >= 0.9 * counts.flops()  # fp32 only for small (n, n) products, if any
    assert counts.flops(torch.float64) == 0
