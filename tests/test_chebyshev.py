"""Paterson–Stockmeyer evaluation of Chebyshev series of a matrix (htmuon_dist/spectral/chebyshev.py)
against the direct sum on the eigenvalues, and its product count."""

from __future__ import annotations

import pytest
import torch

from htmuon_dist.spectral import chebyshev


def _case(n: int = 24, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    lam = torch.linspace(-1.0, 1.0, n, dtype=torch.float64)
    return q, lam, (q * lam) @ q.T, torch.eye(n, dtype=torch.float64)


def _direct(coeffs, lam):
    t = [torch.ones_like(lam), lam]
    while len(t) < len(coeffs):
        t.append(2.0 * lam * t[-1] - t[-2])
    return sum(c * ti for c, ti in zip(coeffs, t))


@pytest.mark.parametrize("degree", list(range(0, 14)))
def test_series_equals_the_direct_sum_and_counts_its_products(degree: int) -> None:
    q, lam, z, eye = _case(seed=degree)
    coeffs = torch.randn(degree + 1, generator=torch.Generator().manual_seed(100 + degree), dtype=torch.float64).tolist()
    want = (q * _direct(coeffs, lam)) @ q.T
    for t2 in (None, 2.0 * z @ z - eye):
        calls = []
        got = chebyshev.matrix_series(coeffs, z, eye, lambda a, b: calls.append(1) or a @ b, t2=t2)
        assert float((got - want).abs().max()) < 1e-12, degree
        assert len(calls) == chebyshev.products(degree, t2_given=t2 is not None)
        # never more than the three-term recurrence (degree - 1 products), and about half at 9-11
        assert len(calls) <= max(0, degree - 1)
    if degree >= 9:
        assert chebyshev.products(degree) <= (degree + 1) // 2


def test_division_identity() -> None:
    # p = T_k q + r with deg r < k, checked on scalars
    lam = torch.linspace(-1.0, 1.0, 101, dtype=torch.float64)
    coeffs = [0.3, -1.0, 0.5, 2.0, -0.7, 0.1, 0.05, -0.4]
    for k in (2, 3, 4, 5):
        q, r = chebyshev.divide(coeffs, k)
        assert len(r) == k
        tk = _direct([0.0] * k + [1.0], lam)
        assert torch.allclose(tk * _direct(q, lam) + _direct(r, lam), _direct(coeffs, lam), atol=1e-12)


@pytest.mark.parametrize("second", [5, 6, 7, 8])
def test_a_shared_basis_costs_only_the_second_series_levels(second: int) -> None:
    # log_ns evaluates its final series and its cut factor on the same Z: the second reuses
    # T_2 .. T_k and spends only its nesting levels (products(..., basis_given=True))
    q, lam, z, eye = _case(seed=second)
    gen = torch.Generator().manual_seed(200 + second)
    first, other = torch.randn(7, generator=gen, dtype=torch.float64).tolist(), torch.randn(second + 1, generator=gen, dtype=torch.float64).tolist()
    k = chebyshev.baby_degree(6)
    basis, calls = [], []
    mm = lambda a, b: calls.append(1) or a @ b  # noqa: E731
    chebyshev.matrix_series(first, z, eye, mm, basis=basis)
    before = len(calls)
    got = chebyshev.matrix_series(other, z, eye, mm, k=k, basis=basis)
    assert float((got - (q * _direct(other, lam)) @ q.T).abs().max()) < 1e-12
    assert len(calls) - before == chebyshev.products(second, k, basis_given=True)
    assert chebyshev.products(second, k, basis_given=True) < chebyshev.products(second, k)
