"""Chebyshev series of a symmetric matrix with few products (Paterson–Stockmeyer in T_k).

``p(Z) = Σ_i c_i T_i(Z)`` for ``Z`` with spectrum in [-1, 1]. The three-term recurrence costs
``d - 1`` products for degree ``d``. Here the series is divided by ``T_k`` repeatedly, in the
Chebyshev basis (``T_k T_j = (T_{k+j} + T_{|k-j|}) / 2``), on the host in float64:

    p = r_0 + T_k (r_1 + T_k (r_2 + ...)),   every r_j of degree < k,

so the matrix side needs ``T_2 .. T_k`` (``k - 1`` products, one fewer when ``T_2`` is given)
and one product per level of the nesting: 5 products instead of 10 at degree 11. Every
operand (``T_i``, ``r_j``, the partial sums) keeps a spectrum bounded by the sums of
coefficients, as in the recurrence, so 16-bit operands stay safe. Used by :mod:`.fast_ns`
(its final multiplier) and :mod:`.log_ns` (its last Gram matrix's terms).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

Product = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def divide(coeffs: Sequence[float], k: int) -> tuple[list[float], list[float]]:
    """(q, r) with ``p = T_k q + r`` and ``deg r < k``, all in Chebyshev coefficients."""
    work = [float(c) for c in coeffs]
    d = len(work) - 1
    if d < k:
        return [], work
    q = [0.0] * (d - k + 1)
    for deg in range(d, k - 1, -1):
        w, j = work[deg], deg - k
        if j == 0:  # T_k T_0 = T_k
            q[0] = w
        else:  # T_k T_j = (T_{k+j} + T_{|k-j|}) / 2
            q[j] = 2.0 * w
            work[abs(k - j)] -= w
        work[deg] = 0.0
    return q, work[:k]


def blocks(coeffs: Sequence[float], k: int) -> list[list[float]]:
    """[r_0, r_1, ..., r_last]: ``p = r_0 + T_k (r_1 + T_k (... r_last))``, each of degree < k."""
    out, q = [], list(coeffs)
    while len(q) > k:
        q, r = divide(q, k)
        out.append(r)
    out.append(q)
    return out


def baby_degree(degree: int) -> int:
    """The k that minimises the product count for a series of this degree (ties: the larger k,
    i.e. fewer nested levels, each of which adds one rounding of the partial sum)."""
    return min(range(2, max(2, degree) + 1), key=lambda k: (products(degree, k), -k))


def products(degree: int, k: Optional[int] = None, t2_given: bool = False, basis_given: bool = False) -> int:
    """Matrix products :func:`matrix_series` spends on a degree-``degree`` series
    (``basis_given``: ``T_2 .. T_k`` come from an earlier series on the same ``Z``)."""
    if degree <= 1:
        return 0
    k = baby_degree(degree) if k is None else k
    levels = math.ceil((degree + 1) / k) - 1
    last_constant = (degree + 1) - k * levels == 1  # the innermost T_k q_0 is a scaled T_k
    basis = 0 if basis_given else (k - 1) - (1 if t2_given and k >= 2 else 0)
    return basis + levels - (1 if last_constant else 0)


def matrix_series(
    coeffs: Sequence[float], z: torch.Tensor, eye: torch.Tensor, mm: Product,
    t2: Optional[torch.Tensor] = None, k: Optional[int] = None, basis: Optional[list] = None,
) -> torch.Tensor:
    """``Σ_i coeffs[i] T_i(Z)`` for Z (..., n, n) with spectrum in [-1, 1]; ``mm`` is the product
    (e.g. ``lambda a, b: precision.mm(a, b, torch.float16)``); ``t2`` is ``T_2(Z)`` if the caller
    has it for free. ``basis``: a list shared by several series on the same ``Z`` (pass ``[]``
    to the first): it keeps ``T_0 .. T_k``, so a later series with the same ``k`` spends only
    its nesting levels. float32 in, float32 out."""
    degree = len(coeffs) - 1
    if degree <= 1:
        out = float(coeffs[0]) * eye if coeffs else torch.zeros_like(eye)
        return out + float(coeffs[1]) * z if degree == 1 else out
    k = baby_degree(degree) if k is None else k
    basis = [] if basis is None else basis
    if not basis:
        basis.extend([eye, z])
    while len(basis) < k + 1:
        if len(basis) == 2 and t2 is not None:
            basis.append(t2)
        else:
            basis.append(2.0 * mm(z, basis[-1]) - basis[-2])
    parts = blocks(coeffs, k)

    def combine(r: list[float]) -> torch.Tensor:
        out = r[0] * eye
        for c, t in zip(r[1:], basis[1:k]):
            out = out + c * t
        return out

    rest = parts[:-1]
    if len(parts[-1]) == 1:  # T_k times a constant: no product
        acc = combine(rest[-1]) + parts[-1][0] * basis[k]
        rest = rest[:-1]
    else:
        acc = combine(parts[-1])
    for r in reversed(rest):
        acc = combine(r) + mm(basis[k], acc)
    return acc
