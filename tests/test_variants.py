"""The reference's variants (issue #13): ``ns_roots`` (htmuon_ns), ``ht`` (htmuon_ht) and the
stateful ``stream_power`` (htmuon_stream), each against an independent float64 implementation
of its formula (built from a float64 SVD and scalar recurrences on the singular values)."""

from __future__ import annotations

import math

import pytest
import torch

from htmuon_dist.spectral import check_power, spectral_power
from htmuon_dist.spectral.accuracy import random_orthonormal, reference, rel_err
from htmuon_dist.spectral.ns_roots import NS_STEPS
from htmuon_dist.spectral.stream import stream_power

NS5 = (3.4445, -4.7750, 2.0315)


def _matrix(m: int, n: int, seed: int, low: float = 1e-2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    s = torch.logspace(0, math.log10(low), k, dtype=torch.float64)
    return (random_orthonormal(m, k, gen) * s) @ random_orthonormal(n, k, gen).T


def _svd(x: torch.Tensor):
    return torch.linalg.svd(x.double(), full_matrices=False)


# --- ht ----------------------------------------------------------------------------------------

def _ht_float64(x: torch.Tensor, p: float, keep_rank: int | None = None) -> torch.Tensor:
    """U diag(i^-p) V^T via the eigendecomposition of the Gram (a different route from ht's SVD)."""
    xd = x.double()
    tall = xd.size(0) >= xd.size(1)
    a = xd if tall else xd.T
    lam, v = torch.linalg.eigh(a.T @ a)
    order = torch.argsort(lam, descending=True)
    lam, v = lam[order], v[:, order]
    k = lam.numel() if keep_rank is None else keep_rank
    lam, v = lam[:k], v[:, :k]
    u = (a @ v) / lam.clamp_min(1e-300).sqrt()
    d = torch.arange(1, k + 1, dtype=torch.float64).pow(-p)
    out = (u * d) @ v.T
    return out if tall else out.T


@pytest.mark.parametrize("shape", [(48, 32), (32, 48), (40, 40)])
@pytest.mark.parametrize("p", [0.0, 0.125, 0.5, 1.0])
def test_ht_matches_float64_formula(shape: tuple[int, int], p: float) -> None:
    x = _matrix(*shape, seed=shape[0] + shape[1]).float()
    y = spectral_power(x, p, method="ht", rtol=0.0)
    assert rel_err(y, _ht_float64(x, p)) < 1e-5


def test_ht_is_scale_free_and_cut_directions_take_no_rank() -> None:
    x = _matrix(40, 24, seed=3).float()
    y = spectral_power(x, 0.125, method="ht")
    assert rel_err(spectral_power(1e-3 * x, 0.125, method="ht"), y) < 1e-5  # f(cM) = f(M)
    gen = torch.Generator().manual_seed(4)
    low = (torch.randn(40, 6, generator=gen, dtype=torch.float64) @ torch.randn(6, 24, generator=gen, dtype=torch.float64)).float()
    y = spectral_power(low, 0.125, method="ht")  # rank 6 + fp32 rounding noise
    assert rel_err(y, _ht_float64(low, 0.125, keep_rank=6)) < 1e-5
    assert torch.equal(spectral_power(torch.zeros(5, 3), 0.125, method="ht"), torch.zeros(5, 3))


# --- ns_roots ----------------------------------------------------------------------------------

def _ns_roots_float64(x: torch.Tensor, p: float, reg: float) -> torch.Tensor:
    """The same recurrences applied to the singular values of a float64 SVD."""
    u, s, vh = _svd(x)
    s = s / torch.linalg.vector_norm(s)  # Frobenius normalisation
    fro = float(torch.linalg.vector_norm(_svd(x)[1]))
    # NS5 polar: normalise (already unit Frobenius), 5 quintic steps on each singular value
    t = s.clone()
    for _ in range(NS_STEPS):
        t = NS5[0] * t + NS5[1] * t**3 + NS5[2] * t**5
    out = u * t
    if p == 0.0:
        return out @ vh
    lam = s**2 + reg**2
    for _ in range(int(round(-math.log2(p))) + 1):
        alpha = torch.linalg.vector_norm(lam)
        y, z = lam / alpha, torch.ones_like(lam)
        for _ in range(NS_STEPS):
            tt = 3.0 - z * y
            y, z = 0.5 * y * tt, 0.5 * tt * z
        lam = alpha.sqrt() * y
    return (out * lam) @ vh * fro**p


@pytest.mark.parametrize("shape", [(48, 32), (32, 48), (40, 40)])
@pytest.mark.parametrize("p", [0.0, 0.125, 0.25, 0.5, 1.0])
def test_ns_roots_matches_float64_formula(shape: tuple[int, int], p: float) -> None:
    x = (7.0 * _matrix(*shape, seed=11 + shape[0])).float()
    y = spectral_power(x, p, method="ns_roots", rtol=1e-3)
    assert y.dtype == torch.float32
    assert rel_err(y, _ns_roots_float64(x, p, 1e-3)) < 2e-4


def test_ns_roots_refuses_powers_other_than_two_to_minus_k() -> None:
    x = torch.randn(20, 10)
    for p in (0.2, 0.3, 0.126, 0.75):
        with pytest.raises(ValueError, match=r"2\^-k.*never rounded"):
            spectral_power(x, p, method="ns_roots")
        with pytest.raises(ValueError, match="ns_roots"):
            check_power("ns_roots", p)
    for p in (0.0, 1.0, 0.5, 0.25, 0.125, 0.0625):
        check_power("ns_roots", p)


def test_ns_roots_is_scale_equivariant() -> None:
    """The reference's absolute 1e-6 breaks f(cM) = c^p f(M) at small scales; relative eps keep it."""
    x = _matrix(64, 32, seed=5).float()
    y = spectral_power(x, 0.125, method="ns_roots").double()
    for c in (1e-3, 1e-6, 1e3):
        assert rel_err(spectral_power(c * x, 0.125, method="ns_roots"), c**0.125 * y) < 1e-4
    assert torch.equal(spectral_power(torch.zeros(6, 4), 0.125, method="ns_roots"), torch.zeros(6, 4))


# --- stream ------------------------------------------------------------------------------------

def _stream_float64_step(x: torch.Tensor, p: float, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's formula ``V = qr(XᵀX V)`` in float64, with Householder QR replaced by
    Cholesky QR (R's diagonal > 0, as stream's sign convention); wide x by its transpose.
    Returns (the update, the new basis)."""
    wide = x.size(0) < x.size(1)
    xd = (x.T if wide else x).double()
    y = xd.T @ (xd @ basis.double())
    r = torch.linalg.cholesky(y.T @ y).T  # Y = Q R with R upper, diag > 0
    q = torch.linalg.solve_triangular(r, y, upper=True, left=False)
    xv = xd @ q
    sig = xv.norm(dim=0)
    out = (xv * sig.pow(p - 1.0)) @ q.T
    return (out.T if wide else out), q


def _stream_float64(x: torch.Tensor, p: float, basis: torch.Tensor) -> torch.Tensor:
    return _stream_float64_step(x, p, basis)[0]


def test_stream_one_step_matches_float64_formula() -> None:
    x = _matrix(40, 24, seed=8, low=0.1).float()
    gen = torch.Generator().manual_seed(9)
    basis = random_orthonormal(24, 24, gen).float()
    y, new_basis, _ = stream_power(x, 0.125, rtol=0.0, basis=basis)
    assert rel_err(y, _stream_float64(x, 0.125, basis)) < 1e-4
    assert torch.allclose(new_basis.T @ new_basis, torch.eye(24), atol=1e-5)


@pytest.mark.parametrize("shape", [(64, 32), (32, 64)])
def test_stream_error_falls_as_the_warm_start_converges(shape: tuple[int, int]) -> None:
    """A slowly rotating matrix: the error against the exact float64 update of each step falls by
    10x or more within 40 steps, and the returned estimate falls with it."""
    m, n = shape
    gen = torch.Generator().manual_seed(12)
    k = min(m, n)
    s = torch.logspace(0, -1.5, k, dtype=torch.float64)
    u0, v0 = random_orthonormal(m, k, gen), random_orthonormal(n, k, gen)
    drift_u = torch.randn(m, m, generator=gen, dtype=torch.float64)
    drift_v = torch.randn(n, n, generator=gen, dtype=torch.float64)
    rot_u = torch.linalg.matrix_exp(1e-3 * (drift_u - drift_u.T))  # a small rotation per step
    rot_v = torch.linalg.matrix_exp(1e-3 * (drift_v - drift_v.T))
    basis, errs, ests = None, [], []
    u, v = u0, v0
    for _ in range(40):
        x = ((u * s) @ v.T).float()
        y, basis, est = stream_power(x, 0.125, basis=basis)
        errs.append(rel_err(y, reference(x, 0.125)[0]))
        ests.append(float(est))
        u, v = rot_u @ u, rot_v @ v
    assert errs[-1] < errs[0] / 10, errs
    assert ests[-1] < ests[0] / 10, ests
    assert errs[-1] < 0.01


def test_stream_checks_the_basis_shape() -> None:
    with pytest.raises(ValueError, match=r"basis must be \(8, 8\)"):
        stream_power(torch.randn(20, 8), 0.125, basis=torch.eye(20))


@pytest.mark.parametrize("shape", [(24, 16), (10, 30)])
def test_htmuon_stream_optimizer_matches_float64_over_steps(shape: tuple[int, int]) -> None:
    """HTMuon(method="stream") for 6 steps against a float64 loop of the whole optimizer: Nesterov
    momentum, the warm-started formula above with the basis carried from step to step, the
    Muon scale and decoupled weight decay; ``stream_error()`` reports an estimate in [0, 1)."""
    from htmuon_dist import HTMuon

    lr, wd, beta, p = 0.02, 0.1, 0.95, 0.125
    gen = torch.Generator().manual_seed(3)
    w = torch.nn.Parameter(torch.randn(*shape, generator=gen))
    opt = HTMuon([w], lr=lr, power=p, momentum=beta, weight_decay=wd, method="stream", process_group=None)
    ref, buf = w.detach().double().clone(), torch.zeros(shape, dtype=torch.float64)
    basis = torch.eye(min(shape), dtype=torch.float64)
    rows, cols = shape
    for step in range(6):
        g = torch.randn(*shape, generator=gen) * (1 + 0.1 * step)
        w.grad = g.clone()
        opt.step()
        buf = beta * buf + (1 - beta) * g.double()
        update, basis = _stream_float64_step((1 - beta) * g.double() + beta * buf, p, basis)
        ref = ref * (1 - lr * wd) - lr * max(1.0, rows / cols) ** 0.5 * update
        assert rel_err(w.detach(), ref) < 1e-6, step
        assert 0.0 <= opt.stream_error() < 1.0
    state = opt.state[w]["method_state"]
    k = min(shape)
    assert torch.allclose(state.reshape(-1)[: k * k].reshape(k, k).double(), basis, atol=1e-4)
