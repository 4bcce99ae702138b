"""Accuracy bar and invariances of the fast / approximate HTMuon methods (CPU, fp32, small).

Bar (REFERENCE.md): ``||Y - R|| / ||R|| <= 0.25 * min_c ||c P - R|| / ||R||`` with ``R = U Σ^p V^T``
and ``P = U V^T`` from a float64 SVD of exactly the tensor the method sees, the same rank cutoff
(``rtol = default_rtol(dtype)``) applied to both.
"""

from __future__ import annotations

import pytest
import torch

from htmuon_dist.spectral import (
    auto_choice,
    available_methods,
    default_rtol,
    get_method,
    newton_schulz5,
    spectral_power,
)

# Every registered HTMuon-capable approximation must meet the bar; "auto" is among them.
APPROX = sorted(
    name for name in available_methods()
    if get_method(name).powers == "any" and not get_method(name).exact
)
SPECTRA = ["gaussian", "inv_i", "spike_bulk", "logspace", "rank_fp32", "rank_bf16"]
SCALES = [1e-6, 1.0, 1e3]
POWERS = [0.125, 0.3, 0.5]
SHAPES = [(96, 64), (64, 96), (80, 80)]


def _orth(rows: int, k: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(rows, k, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def make_matrix(kind: str, m: int, n: int, scale: float, seed: int) -> torch.Tensor:
    """A (m, n) test matrix of Frobenius norm ``scale``: fp32, or bf16 for ``rank_bf16``."""
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    if kind == "gaussian":
        mat = torch.randn(m, n, generator=gen, dtype=torch.float64)
    elif kind in ("rank_fp32", "rank_bf16"):
        # a low-rank product computed in the storage dtype: its rounding noise must fall under
        # that dtype's cutoff and map to zero
        r = max(1, k // 4)
        dt = torch.bfloat16 if kind == "rank_bf16" else torch.float32
        a = torch.randn(m, r, generator=gen).to(dt)
        b = torch.randn(n, r, generator=gen).to(dt)
        prod = (a @ b.T).double()
        return (prod / prod.norm() * scale).to(dt)
    else:
        i = torch.arange(1, k + 1, dtype=torch.float64)
        if kind == "inv_i":
            s = 1.0 / i
        elif kind == "spike_bulk":
            s = 1.0 + 0.1 * torch.rand(k, generator=gen, dtype=torch.float64)
            s[:3] *= torch.tensor([100.0, 30.0, 10.0], dtype=torch.float64)
        elif kind == "logspace":
            s = torch.logspace(0, -4, k, dtype=torch.float64)
        else:
            raise ValueError(kind)
        mat = (_orth(m, k, gen) * s) @ _orth(n, k, gen).T
    return (mat / mat.norm() * scale).to(torch.float32)


def reference(mat: torch.Tensor, power: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, P) float64 from the SVD with the dtype's rank cutoff (as exact.py's ``_powered``)."""
    u, s, vh = torch.linalg.svd(mat.double(), full_matrices=False)
    keep = s > default_rtol(mat.dtype) * s.max()
    safe = torch.where(keep, s, torch.ones_like(s))
    sp = torch.where(keep, safe.pow(power), torch.zeros_like(s))
    return (u * sp) @ vh, (u * keep.double()) @ vh


def bar(r: torch.Tensor, p: torch.Tensor) -> float:
    c = (p * r).sum() / (p * p).sum()
    return 0.25 * float((c * p - r).norm() / r.norm())


def rel_err(y: torch.Tensor, r: torch.Tensor) -> float:
    return float((y.double() - r).norm() / r.norm())


def test_there_is_a_fast_method_and_auto() -> None:
    assert "auto" in APPROX
    assert len(APPROX) >= 2
    for name in APPROX:
        spec = get_method(name)
        assert spec.cost(4096, 2048) > 0


@pytest.mark.parametrize("method", APPROX)
@pytest.mark.parametrize("kind", SPECTRA)
def test_accuracy_bar(method: str, kind: str) -> None:
    worst = 0.0
    for si, scale in enumerate(SCALES):
        for shi, (m, n) in enumerate(SHAPES):
            mat = make_matrix(kind, m, n, scale, seed=100 * si + shi)
            for power in POWERS:
                r, p = reference(mat, power)
                y = spectral_power(mat, power, method=method)
                assert y.dtype == mat.dtype and y.shape == mat.shape
                assert torch.isfinite(y).all()
                ratio = rel_err(y, r) / bar(r, p)
                worst = max(worst, ratio)
                assert ratio <= 1.0, (method, kind, scale, (m, n), power, ratio)
    assert worst < 1.0


@pytest.mark.parametrize("kind", ["gaussian", "logspace"])
def test_bar_has_teeth(kind: str) -> None:
    """Rescaled Muon (NS5, even the exact polar factor) must fail the bar at p = 1/8."""
    mat = make_matrix(kind, 96, 64, 1.0, seed=7)
    r, p = reference(mat, 0.125)
    for y in (newton_schulz5(mat).double(), p):
        y = y * (y * r).sum() / (y * y).sum()
        assert rel_err(y, r) > bar(r, p)


@pytest.mark.parametrize("method", APPROX)
def test_equivariances(method: str) -> None:
    mat = make_matrix("gaussian", 72, 40, 1.0, seed=3)
    power = 0.125
    base = spectral_power(mat, power, method=method).double()
    for c in (1e-3, 7.0):
        scaled = spectral_power(mat * c, power, method=method).double()
        assert rel_err(scaled, base * c**power) < 1e-4
    transposed = spectral_power(mat.T.contiguous(), power, method=method).double()
    assert rel_err(transposed, base.T) < 1e-5
    gen = torch.Generator().manual_seed(5)
    q1, q2 = _orth(72, 72, gen), _orth(40, 40, gen)
    rotated = spectral_power((q1 @ mat.double() @ q2.T).float(), power, method=method).double()
    assert rel_err(rotated, q1 @ base @ q2.T) < 1e-4


@pytest.mark.parametrize("method", APPROX)
@pytest.mark.parametrize("shape", [(32, 16), (16, 32), (3, 32, 16)])
def test_zero_matrix(method: str, shape: tuple[int, ...]) -> None:
    y = spectral_power(torch.zeros(shape), 0.125, method=method)
    assert torch.equal(y, torch.zeros(shape))


@pytest.mark.parametrize("method", APPROX)
def test_limits(method: str) -> None:
    mat = make_matrix("inv_i", 48, 32, 1.0, seed=11)
    assert rel_err(spectral_power(mat, 1.0, method=method), mat.double()) < 1e-4
    r0, p0 = reference(mat, 0.0)
    assert rel_err(spectral_power(mat, 0.0, method=method), p0) < 1e-4


@pytest.mark.parametrize("method", APPROX)
def test_batch_equals_per_matrix(method: str) -> None:
    mats = torch.stack([
        make_matrix("gaussian", 40, 24, 1.0, seed=1),
        make_matrix("logspace", 40, 24, 1e-5, seed=2),
        torch.zeros(40, 24),
        make_matrix("spike_bulk", 40, 24, 300.0, seed=4),
    ])
    batched = spectral_power(mats, 0.125, method=method)
    for i in range(mats.size(0)):
        single = spectral_power(mats[i], 0.125, method=method)
        assert torch.allclose(batched[i], single, rtol=1e-4, atol=1e-6 * single.abs().max() + 1e-30)


def test_auto_choice_is_registered_and_meets_bar() -> None:
    for device in ("cpu", "cuda"):
        for m, n in [(512, 512), (5461, 2048), (11008, 4096)]:
            name = auto_choice(device, m, n)
            spec = get_method(name)
            assert spec.powers == "any"
    mat = make_matrix("logspace", 64, 48, 1.0, seed=9)
    r, p = reference(mat, 0.125)
    y = spectral_power(mat, 0.125, method="auto")
    assert rel_err(y, r) <= bar(r, p)
