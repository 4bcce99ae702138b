"""``normuon_rescale`` against an independent float64 implementation of the reference formula."""

from __future__ import annotations

import math

import pytest
import torch

from htmuon_dist.normuon import normuon_rescale


def _normuon_float64(o: list[list[float]], v: list[float], beta2: float, eps: float):
    """Plain-Python loops over rows and columns (REFERENCE.md's formula, step by step)."""
    m, n = len(o), len(o[0])
    norm = math.sqrt(sum(x * x for row in o for x in row))
    new_v = [v[i] + (1 - beta2) * (sum(x * x for x in o[i]) / n - v[i]) for i in range(m)]
    out = [[o[i][j] / math.sqrt(new_v[i] + eps) for j in range(n)] for i in range(m)]
    norm2 = math.sqrt(sum(x * x for row in out for x in row))
    out = [[x * norm / (norm2 + eps) for x in row] for row in out]
    return out, new_v


@pytest.mark.parametrize("shape", [(12, 7), (5, 16)])
def test_normuon_matches_float64_over_steps(shape: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(shape[0])
    m, n = shape
    v = torch.zeros(m)
    v_ref = [0.0] * m
    for step in range(4):
        o = torch.randn(m, n, generator=gen) * torch.linspace(0.1, 3.0, m).unsqueeze(1)
        out, v = normuon_rescale(o, v, 0.95)
        ref, v_ref = _normuon_float64(o.double().tolist(), v_ref, 0.95, 1e-10)
        ref_t = torch.tensor(ref, dtype=torch.float64)
        assert float((out.double() - ref_t).norm() / ref_t.norm()) < 1e-6, step
        assert torch.allclose(v.double(), torch.tensor(v_ref, dtype=torch.float64), rtol=1e-6)
        assert out.norm().item() == pytest.approx(o.norm().item(), rel=1e-5)  # Frobenius kept


def test_normuon_equalises_row_norms_and_keeps_inputs() -> None:
    o = torch.randn(8, 32) * torch.logspace(-2, 1, 8).unsqueeze(1)
    v0 = torch.zeros(8)
    out, v = normuon_rescale(o, v0, 0.0)  # beta2 = 0: v is this step's row mean square
    rows = out.norm(dim=1)
    assert float(rows.max() / rows.min()) < 1.0 + 1e-4
    assert torch.equal(v0, torch.zeros(8))
    z, _ = normuon_rescale(torch.zeros(3, 4), torch.zeros(3), 0.95)
    assert torch.equal(z, torch.zeros(3, 4))


def test_normuon_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match=r"v must have shape \(4,\)"):
        normuon_rescale(torch.randn(4, 3), torch.zeros(3), 0.95)
    with pytest.raises(ValueError, match="beta2"):
        normuon_rescale(torch.randn(4, 3), torch.zeros(4), 1.0)
