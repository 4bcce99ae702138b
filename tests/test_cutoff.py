"""The default rank cutoff follows the input's rounding noise (issue #13, docs/spectral.md).

Two bf16 properties, for every HTMuon method, on several shapes and spectra, against float64
references, each within the HTMuon accuracy bar (0.25 x the Muon-HTMuon gap):

* keep: a full-rank matrix with real small singular values (sigma_i = 1/i, ...), rounded to bf16,
  keeps them: reference = the float64 SVD of exactly the bf16 values, no cutoff;
* drop: a rank-deficient matrix (low-rank product, LayerNorm-style gradient, heterogeneous rows)
  rounded to bf16 loses the directions rounding created: reference = HTMuon of the unrounded
  float64 matrix.

Both are also run the way the exchange engine computes: an fp32 copy of bf16 values with
``eps = 2**-7``. Each test checks that it can fail: the former fixed cutoff (4 eps sigma_max)
fails "keep", no cutoff fails "drop".
"""

from __future__ import annotations

import math

import pytest
import torch

from htmuon_dist.spectral import Cutoff, available_methods, get_method, spectral_power
from htmuon_dist.spectral.accuracy import bar, random_orthonormal, reference, rel_err

P = 0.125
BF16_EPS = 2.0**-7
METHODS = sorted(  # stateful "stream": its cutoff is tested in test_variants.py
    n for n in available_methods()
    if get_method(n).powers == "any" and get_method(n).target == "sigma_power"
    and get_method(n).stateful is None
)
SHAPES = [(172, 64), (64, 172), (256, 128), (160, 160)]
KEEP_SPECTRA = ["inv_i", "gaussian", "spike_bulk", "log_1e-2"]
DROP_KINDS = ["rank_quarter", "layernorm_grad", "hetero_rows"]


def _spectrum_matrix(kind: str, m: int, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    if kind == "gaussian":
        return torch.randn(m, n, generator=gen, dtype=torch.float64) / math.sqrt(max(m, n))
    i = torch.arange(1, k + 1, dtype=torch.float64)
    if kind == "inv_i":
        s = 1.0 / i
    elif kind == "spike_bulk":
        s = 0.05 + 0.01 * torch.rand(k, generator=gen, dtype=torch.float64)
        s[:3] = torch.tensor([1.0, 0.5, 0.2], dtype=torch.float64)
    elif kind == "log_1e-2":
        s = torch.logspace(0, -2, k, dtype=torch.float64)
    else:
        raise ValueError(kind)
    return (random_orthonormal(m, k, gen) * s) @ random_orthonormal(n, k, gen).T


def _deficient_matrix(kind: str, m: int, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    if kind == "rank_quarter":
        r = k // 4
        return torch.randn(m, r, generator=gen, dtype=torch.float64) @ torch.randn(r, n, generator=gen, dtype=torch.float64)
    if kind == "layernorm_grad":
        # gradient of a weight whose inputs went through a mean-removing norm: G 1 = 0, and
        # G has rank min(batch, n - 1) with a batch of n // 2 tokens
        x = torch.randn(n // 2, n, generator=gen, dtype=torch.float64)
        x = x - x.mean(dim=1, keepdim=True)
        delta = torch.randn(n // 2, m, generator=gen, dtype=torch.float64)
        return delta.T @ x
    if kind == "hetero_rows":
        r = k // 4
        rows = torch.exp(1.5 * torch.randn(m, 1, generator=gen, dtype=torch.float64))
        return rows * (torch.randn(m, r, generator=gen, dtype=torch.float64) @ torch.randn(r, n, generator=gen, dtype=torch.float64))
    raise ValueError(kind)


def _ratio(y: torch.Tensor, r: torch.Tensor, p: torch.Tensor) -> float:
    return rel_err(y, r) / bar(r, p)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KEEP_SPECTRA)
def test_bf16_keeps_real_small_singular_values(method: str, kind: str) -> None:
    worst_new, worst_old = 0.0, 0.0
    for si, (m, n) in enumerate(SHAPES):
        if kind == "gaussian" and m == n:
            continue  # square Gaussian: sigma_min -> 0, real directions beneath the noise
        x = _spectrum_matrix(kind, m, n, seed=10 + si).to(torch.bfloat16)
        r, p = reference(x, P, rtol=0.0)  # the exact result of exactly these bf16 values
        y_bf16 = spectral_power(x, P, method=method)
        y_wire = spectral_power(x.float(), P, method=method, eps=BF16_EPS)  # engine: fp32 copy
        assert y_bf16.dtype == torch.bfloat16 and y_wire.dtype == torch.float32
        worst_new = max(worst_new, _ratio(y_bf16, r, p), _ratio(y_wire, r, p))
        assert worst_new <= 1.0, (method, kind, (m, n), worst_new)
        old = spectral_power(x.float(), P, method=method, rtol=4 * BF16_EPS)
        worst_old = max(worst_old, _ratio(old, r, p))
    # the former fixed cutoff (4 eps sigma_max = 0.031 sigma_max) fails where real singular
    # values lie under it; tracked_ns applied it softly (lifting from rtol / n^(1/8)), and
    # fast_ns raises any cutoff to its operands' noise rule (lifting from 4 tau), log_ns too
    # (lifting from tau).
    if kind in ("inv_i", "log_1e-2") and method not in ("tracked_ns", "fast_ns", "log_ns"):
        assert worst_old > 1.0, (method, kind, worst_old)


@pytest.mark.parametrize("method", [m for m in METHODS if get_method(m).cuts_noise])
@pytest.mark.parametrize("kind", DROP_KINDS)
def test_bf16_drops_rounding_made_null_directions(method: str, kind: str) -> None:
    worst_new, worst_none = 0.0, 0.0
    for si, (m, n) in enumerate(SHAPES):
        exact = _deficient_matrix(kind, m, n, seed=20 + si)
        x = exact.to(torch.bfloat16)
        r, p = reference(exact, P, rtol=1e-10)  # HTMuon of the unrounded matrix
        for y in (spectral_power(x, P, method=method), spectral_power(x.float(), P, method=method, eps=BF16_EPS)):
            worst_new = max(worst_new, _ratio(y, r, p))
        assert worst_new <= 1.0, (method, kind, (m, n), worst_new)
        none = spectral_power(x.float(), P, method=method, rtol=0.0)
        worst_none = max(worst_none, _ratio(none, r, p))
    assert worst_none > 1.0, (method, kind, worst_none)  # without a cutoff the noise gets weight


def test_layernorm_gradient_update_stays_orthogonal_to_ones() -> None:
    exact = _deficient_matrix("layernorm_grad", 256, 128, seed=5)
    x = exact.to(torch.bfloat16).float()
    ones = torch.ones(128, 1) / 128**0.5
    for method in (m for m in METHODS if get_method(m).cuts_noise):
        y = spectral_power(x, P, method=method, eps=BF16_EPS)
        assert float((y @ ones).norm() / y.norm()) < 2e-2, method


def test_explicit_rtol_keeps_its_meaning() -> None:
    x = _spectrum_matrix("inv_i", 64, 32, seed=1).float()
    s = torch.linalg.svdvals(x.double())
    for rtol in (0.05, 0.2):
        y = spectral_power(x, 1.0, method="svd", rtol=rtol)
        kept = torch.linalg.svdvals(y.double())
        assert int((kept > 1e-6).sum()) == int((s > rtol * s.max()).sum())
    assert isinstance(Cutoff(0.1), float) and Cutoff(0.1, 0.2).fro == 0.2
