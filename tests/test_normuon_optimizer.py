"""NorMuon / HTNorMuon inside HTMuon, one process: the optimizer's trajectory against an
independent float64 implementation of the reference's formula (REFERENCE.md, NorMuon row),
and the option's validation.

The float64 side re-derives everything from the formula: momentum, Nesterov blend, the
spectral map (float64 SVD for U Σ^p V^T; float64 quintic Newton-Schulz with Muon's
coefficients for NorMuon's ns5), the per-row EMA without bias correction, the division by
sqrt(v + 1e-10), the rescale to the Frobenius norm before the division, Muon's max(1, m/n)^0.5,
and decoupled weight decay. Gradients are fixed per step (not model-dependent), so the
comparison measures the optimizer alone.
"""

from __future__ import annotations

import pytest
import torch

from htmuon_dist import HTMuon

LR, WD, BETA, BETA2 = 0.05, 0.1, 0.95, 0.9
STEPS = 5
TOL = 1e-5


def _ns5_float64(x: torch.Tensor) -> torch.Tensor:
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = x.shape[0] > x.shape[1]
    y = x.T if tall else x
    y = y / (torch.sqrt((y * y).sum()) + 1e-7)
    for _ in range(5):
        gram = y @ y.T
        y = a * y + (b * gram + c * gram @ gram) @ y
    return y.T if tall else y


def _spectral_float64(x: torch.Tensor, power: float, method: str) -> torch.Tensor:
    if method == "ns5":
        return _ns5_float64(x)
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    return (u * s.pow(power)) @ vh


def reference_trajectory(w0, grads, power, method, beta2=BETA2, normuon=True):
    """float64: the parameters after every step and the final per-row second moment."""
    w = w0.double().clone()
    m, n = w.shape
    buf = torch.zeros_like(w)
    v = torch.zeros(m, dtype=torch.float64)
    out = []
    for g in grads:
        g = g.double()
        buf = BETA * buf + (1 - BETA) * g
        blend = (1 - BETA) * g + BETA * buf  # Nesterov: lerp(g, buf, beta)
        o = _spectral_float64(blend, power, method)
        if normuon:
            fro = torch.sqrt((o * o).sum())
            v = beta2 * v + (1 - beta2) * (o * o).sum(dim=1) / n
            o = o / torch.sqrt(v + 1e-10).unsqueeze(1)
            o = o * (fro / (torch.sqrt((o * o).sum()) + 1e-10))
        w = w * (1 - LR * WD) - LR * max(1.0, m / n) ** 0.5 * o
        out.append(w.clone())
    return out, v


def optimizer_trajectory(w0, grads, **kwargs):
    w = torch.nn.Parameter(w0.clone())
    opt = HTMuon([{"params": [w], "htmuon": True}], lr=LR, weight_decay=WD, momentum=BETA,
                 process_group=None, **kwargs)
    out = []
    for g in grads:
        w.grad = g.clone()
        opt.step()
        out.append(w.detach().double().clone())
    return out, opt.state[w].get("normuon_v")


def _problem(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(*shape, generator=gen) * 0.1
    # rows of very different scales, so that the per-row normalisation matters
    row_scale = torch.logspace(-1, 1, shape[0]).unsqueeze(1)
    grads = [torch.randn(*shape, generator=gen) * row_scale for _ in range(STEPS)]
    return w0, grads


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("shape", [(24, 10), (8, 20)])
@pytest.mark.parametrize("power,method", [(0.0, "ns5"), (0.125, "eigh"), (0.125, "svd")])
def test_normuon_and_htnormuon_match_float64_reference_over_steps(shape, power, method):
    w0, grads = _problem(shape, seed=shape[0])
    got, v = optimizer_trajectory(w0, grads, power=power, method=method, normuon=True,
                                  normuon_beta2=BETA2)
    want, v_ref = reference_trajectory(w0, grads, power, method)
    for step, (a, b) in enumerate(zip(got, want)):
        # the parameters' change, so that a small update's error is not hidden by w0
        assert _rel(a - w0.double(), b - w0.double()) < TOL, (step, _rel(a - w0.double(), b - w0.double()))
    assert v.dtype == torch.float32 and v.shape == (shape[0],)
    assert _rel(v.double(), v_ref) < TOL
    # the check has teeth: without the row normalisation the same run is far off
    plain, _ = reference_trajectory(w0, grads, power, method, normuon=False)
    assert _rel(plain[-1] - w0.double(), want[-1] - w0.double()) > 1000 * TOL


def test_interval_variant_normalises_every_step():
    """htnormuon_interval: exact HTMuon on every 2nd step, NS5 otherwise, NorMuon on all."""
    w0, grads = _problem((16, 12), seed=3)
    got, v = optimizer_trajectory(w0, grads, power=0.125, method="eigh", interval=2,
                                  normuon=True, normuon_beta2=BETA2)
    w = w0.double().clone()
    buf = torch.zeros_like(w)
    v_ref = torch.zeros(16, dtype=torch.float64)
    for step, g in enumerate(grads, start=1):
        g = g.double()
        buf = BETA * buf + (1 - BETA) * g
        blend = (1 - BETA) * g + BETA * buf
        o = _spectral_float64(blend, 0.125, "svd") if step % 2 == 0 else _ns5_float64(blend)
        fro = o.norm()
        v_ref = BETA2 * v_ref + (1 - BETA2) * o.square().mean(dim=1)
        o = o / torch.sqrt(v_ref + 1e-10).unsqueeze(1)
        o = o * fro / o.norm()
        w = w * (1 - LR * WD) - LR * (16 / 12) ** 0.5 * o
        assert _rel(got[step - 1] - w0.double(), w - w0.double()) < TOL, step
    assert _rel(v.double(), v_ref) < TOL


def test_normuon_per_group_keys_and_state():
    """normuon is a per-group key: one group with it, one without; only the first gets v."""
    gen = torch.Generator().manual_seed(0)
    a = torch.nn.Parameter(torch.randn(6, 4, generator=gen))
    b = torch.nn.Parameter(torch.randn(5, 4, generator=gen))
    opt = HTMuon([{"params": [a], "normuon": True, "normuon_beta2": 0.5}, {"params": [b]}],
                 lr=0.01, process_group=None)
    assert [g.get("normuon") for g in opt.param_groups] == [True, False]
    assert "normuon" not in [k for g in opt.param_groups if not g["htmuon"] for k in g]
    a.grad, b.grad = torch.randn(6, 4, generator=gen), torch.randn(5, 4, generator=gen)
    opt.step()
    assert opt.state[a]["normuon_v"].shape == (6,) and "normuon_v" not in opt.state[b]
    # beta2 = 0.5 from the group, not the default 0.95: v = 0.5 * mean of squares of O
    assert float(opt.state[a]["normuon_v"].sum()) > 0


def test_state_dict_round_trip_keeps_v_float32_for_bf16_parameters():
    w = torch.nn.Parameter(torch.randn(8, 5).bfloat16())
    opt = HTMuon([w], lr=0.01, power=0.0, method="ns5", normuon=True, process_group=None)
    for _ in range(2):
        w.grad = torch.randn(8, 5).bfloat16()
        opt.step()
    v = opt.state[w]["normuon_v"].clone()
    assert v.dtype == torch.float32
    assert not torch.equal(v, v.bfloat16().float()), "v happens to be bf16-exact; pick another seed"
    w2 = torch.nn.Parameter(torch.zeros(8, 5).bfloat16())
    opt2 = HTMuon([w2], lr=0.01, power=0.0, method="ns5", normuon=True, process_group=None)
    opt2.load_state_dict(opt.state_dict())
    # torch would cast floating state to the parameter's dtype (bf16); v must stay exact
    assert torch.equal(opt2.state[w2]["normuon_v"], v)
    assert opt2.state[w2]["momentum_buffer"].dtype == torch.bfloat16


@pytest.mark.parametrize("kwargs, needle", [
    (dict(normuon="yes"), "normuon must be True or False"),
    (dict(normuon=True, normuon_beta2=1.0), r"normuon_beta2 must be a number in \[0, 1\)"),
    (dict(normuon=True, normuon_beta2=-0.1), "normuon_beta2"),
    (dict(method="ns_roots", power=0.2), r"2\^-k"),  # check_power at construction
    (dict(method="ns5", power=0.125), "power"),
])
def test_bad_normuon_or_power_arguments_fail_at_construction(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        HTMuon([torch.nn.Parameter(torch.zeros(4, 3))], **kwargs)
    with pytest.raises(ValueError, match=needle):  # and as per-group keys
        HTMuon([{"params": [torch.nn.Parameter(torch.zeros(4, 3))], **kwargs}])


@pytest.mark.parametrize("method,power", [("ns5", 0.0), ("eigh", 0.125)])
def test_one_process_normuon_step_stays_within_the_memory_contract(method, power):
    """The owner's float32 rescale temporaries are part of memory_bound()."""
    from memtrack import allocator_peak
    from test_scale_step import SMALL_1B

    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s, generator=gen) * 0.02) for s in SMALL_1B]
    opt = HTMuon([{"params": params, "htmuon": True}], lr=0.01, method=method, power=power,
                 normuon=True, process_group=None)
    for seed in (1, 2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        if seed == 1:
            opt.step()  # creates momentum and v
        else:
            peak = allocator_peak(opt.step)
    bound = opt.memory_bound()
    assert 0 < peak <= bound, (peak, bound)


def test_deepspeed_elastic_checkpoint_is_refused_with_normuon():
    from htmuon_dist.integrations.deepspeed import DeepSpeedConfigError, check_config

    cfg = {"zero_optimization": {"stage": 2, "elastic_checkpoint": True}}
    normuon = HTMuon([torch.nn.Parameter(torch.zeros(4, 3))], normuon=True)
    with pytest.raises(DeepSpeedConfigError, match="elastic_checkpoint"):
        check_config(cfg, normuon, on_cpu=False)
    check_config(cfg, HTMuon([torch.nn.Parameter(torch.zeros(4, 3))]), on_cpu=False)  # no row state
