"""Single-process HTMuon: the update rule by hand, routing, state, bad input, a tiny LLaMA."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from htmuon_dist import HTMuon, param_groups
from spectra import reference_power, rel_err
from tiny_llama import tiny_llama

RTOL32 = 4 * torch.finfo(torch.float32).eps


def _by_hand_power(m: torch.Tensor, p: float) -> torch.Tensor:
    return reference_power(m, p, RTOL32)


def test_two_steps_equal_the_formula():
    torch.manual_seed(0)
    w0 = torch.randn(12, 7)
    w = nn.Parameter(w0.clone())
    lr, wd, beta, p = 0.05, 0.1, 0.95, 0.125
    opt = HTMuon([w], lr=lr, weight_decay=wd, momentum=beta, power=p, method="eigh")
    grads = [torch.randn(12, 7), torch.randn(12, 7)]
    ref = w0.double()
    buf = torch.zeros(12, 7, dtype=torch.float64)
    for g in grads:
        w.grad = g.clone()
        opt.step()
        gd = g.double()
        buf = buf + (1 - beta) * (gd - buf)
        m = gd + beta * (buf - gd)
        ref = ref * (1 - lr * wd) - lr * (12 / 7) ** 0.5 * _by_hand_power(m.float(), p)
    assert rel_err(w.detach(), ref) < 1e-6
    assert torch.equal(w.grad, grads[-1])  # the optimizer must not modify gradients


def test_adamw_part_equals_the_formula():
    torch.manual_seed(1)
    b = nn.Parameter(torch.randn(5))
    b0 = b.detach().clone().double()
    lr, (b1, b2), eps, wd = 1e-2, (0.9, 0.95), 1e-10, 0.1
    opt = HTMuon([b], adamw_lr=lr, adamw_betas=(b1, b2), adamw_eps=eps, adamw_weight_decay=wd)
    assert opt.param_groups[0]["htmuon"] is False and opt.param_groups[0]["lr"] == lr
    m = v = torch.zeros(5, dtype=torch.float64)
    ref = b0
    for t in (1, 2, 3):
        g = torch.randn(5)
        b.grad = g.clone()
        opt.step()
        gd = g.double()
        m = b1 * m + (1 - b1) * gd
        v = b2 * v + (1 - b2) * gd * gd
        ref = ref * (1 - lr * wd) - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
    assert rel_err(b.detach(), ref) < 1e-6


@pytest.mark.parametrize("method", ["svd", "eigh"])
def test_power_zero_is_muon_with_an_exact_polar_factor(method):
    torch.manual_seed(2)
    w = nn.Parameter(torch.randn(6, 10))
    w0 = w.detach().clone()
    opt = HTMuon([w], lr=0.1, power=0.0, method=method, nesterov=False, momentum=0.9)
    g = torch.randn(6, 10)
    w.grad = g
    opt.step()
    u, _, vh = torch.linalg.svd((0.1 * g).double(), full_matrices=False)
    assert rel_err(w.detach(), w0.double() - 0.1 * (u @ vh)) < 1e-6


def test_conv_weights_are_flattened_to_2d():
    torch.manual_seed(3)
    w = nn.Parameter(torch.randn(8, 3, 3, 3))
    w0 = w.detach().clone()
    opt = HTMuon([w], lr=0.1, power=0.25, nesterov=False, momentum=0.0)
    g = torch.randn(8, 3, 3, 3)
    w.grad = g
    opt.step()
    expected = w0.double().view(8, 27) - 0.1 * _by_hand_power(g.view(8, 27), 0.25)
    assert rel_err(w.detach().view(8, 27), expected) < 1e-6


def _jordan_ns5(g: torch.Tensor) -> torch.Tensor:
    """Muon's Newton-Schulz (K. Jordan's quintic, coefficients 3.4445, -4.7750, 2.0315, five
    iterations on the Frobenius-normalised matrix, the short side's Gram), in float64: written
    here, not the library's newton_schulz5, so that the test can catch a change to it."""
    y = g.double()
    tall = y.shape[0] > y.shape[1]
    if tall:
        y = y.T
    y = y / (torch.linalg.vector_norm(y) + 1e-7)
    for _ in range(5):
        gram = y @ y.T
        y = 3.4445 * y + (-4.7750 * gram + 2.0315 * gram @ gram) @ y
    return y.T if tall else y


def test_interval_variant_runs_exact_every_kth_step_and_muon_between():
    torch.manual_seed(4)
    w = nn.Parameter(torch.zeros(16, 8))
    opt = HTMuon([w], lr=1.0, power=0.125, interval=3, nesterov=False, momentum=0.0)
    for step in range(1, 7):
        g = torch.randn(16, 8)
        before = w.detach().clone()
        w.grad = g
        opt.step()
        delta = before - w.detach()
        scale = 2**0.5
        if step % 3 == 0:
            expected = scale * _by_hand_power(g, 0.125)
        else:
            expected = scale * _jordan_ns5(g)
        assert rel_err(delta, expected) < 1e-5, step


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(5)
    model = tiny_llama(seed=0)
    opt = HTMuon(param_groups(model), lr=0.02, adamw_lr=1e-3, weight_decay=0.1)
    batches = [torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(6)]

    def train(m, o, data):
        for x in data:
            m(input_ids=x, labels=x).loss.backward()
            o.step()
            o.zero_grad()

    train(model, opt, batches[:3])
    clone = copy.deepcopy(model)
    clone_opt = HTMuon(param_groups(clone), lr=0.02, adamw_lr=1e-3, weight_decay=0.1)
    clone_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    train(model, opt, batches[3:])
    train(clone, clone_opt, batches[3:])
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)
    assert opt.state_dict()["param_groups"] == clone_opt.state_dict()["param_groups"]


def test_routing_and_param_group_conventions():
    model = tiny_llama(seed=0)
    ref = param_groups(model, "reference")
    muon = param_groups(model, "muon")
    ref_matrix = set(ref[0]["param_names"])
    muon_matrix = set(muon[0]["param_names"])
    assert "model.embed_tokens.weight" in ref_matrix and "lm_head.weight" in ref_matrix
    assert "model.embed_tokens.weight" not in muon_matrix and "lm_head.weight" not in muon_matrix
    assert ref_matrix - muon_matrix == {"model.embed_tokens.weight", "lm_head.weight"}
    assert all("norm" in n for n in ref[1]["param_names"])
    # a group without "htmuon" is split by dimension and keeps separate learning rates
    opt = HTMuon(model.parameters(), lr=0.03, adamw_lr=1e-3)
    flags = [(g["htmuon"], g["lr"]) for g in opt.param_groups]
    assert flags == [(True, 0.03), (False, 1e-3)]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.015, 5e-4]
    with pytest.raises(ValueError, match="convention"):
        param_groups(model, "adam")


def test_param_groups_route_zero3_partitioned_parameters_by_their_real_shape():
    # under DeepSpeed zero.Init a partitioned parameter is empty and keeps its shape in ds_shape;
    # routing (and every other reader, through matrix_views.logical_shape) must use that shape
    from htmuon_dist.matrix_views import logical_shape

    model = torch.nn.Module()
    model.proj = torch.nn.Linear(4, 8, bias=True)
    for p, real in ((model.proj.weight, (8, 4)), (model.proj.bias, (8,))):
        p.data = torch.empty(0)
        p.ds_shape = torch.Size(real)
    assert logical_shape(model.proj.weight) == (8, 4) and logical_shape(torch.zeros(2, 3)) == (2, 3)
    groups = param_groups(model, "reference")
    assert groups[0]["htmuon"] and groups[0]["param_names"] == ["proj.weight"]
    assert groups[1]["param_names"] == ["proj.bias"]


def test_tiny_llama_loss_falls_over_50_steps():
    model = tiny_llama(seed=0)
    opt = HTMuon(param_groups(model), lr=0.02, adamw_lr=3e-3)
    data = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(50):
        loss = model(input_ids=data, labels=data).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_tracked_ns_trains_like_the_exact_method():
    """HTMuon(method="tracked_ns") follows the eigh run on a tiny LLaMA within its error bound."""
    runs = {}
    for method in ("eigh", "tracked_ns"):
        model = tiny_llama(seed=0)
        opt = HTMuon(param_groups(model), lr=0.02, adamw_lr=3e-3, method=method)
        data = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
        for _ in range(5):
            model(input_ids=data, labels=data).loss.backward()
            opt.step()
            opt.zero_grad()
        runs[method] = model
    for (name, a), (_, b) in zip(runs["eigh"].named_parameters(), runs["tracked_ns"].named_parameters()):
        assert rel_err(b.detach(), a.detach().double()) < 2e-3, name


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_raises_and_changes_nothing(bad):
    w = nn.Parameter(torch.randn(4, 4))
    b = nn.Parameter(torch.randn(4))
    opt = HTMuon([w, b], lr=0.1, check_every=1)  # the flag is read at every step's check
    w.grad, b.grad = torch.randn(4, 4), torch.randn(4)
    opt.step()
    params = [w.detach().clone(), b.detach().clone()]
    state = copy.deepcopy(opt.state_dict())
    w.grad = torch.randn(4, 4)
    w.grad[1, 2] = bad
    with pytest.raises(FloatingPointError, match=r"non-finite gradient \(param_groups\[0\]"):
        opt.step()
    assert torch.equal(w, params[0]) and torch.equal(b, params[1])
    after = opt.state_dict()
    for key, value in state["state"].items():
        for name, tensor in value.items():
            assert torch.equal(after["state"][key][name], tensor)


def test_nonfinite_gradient_skip_mode_skips_the_step():
    w = nn.Parameter(torch.randn(4, 4))
    opt = HTMuon([w], lr=0.1, nonfinite="skip")
    before = w.detach().clone()
    w.grad = torch.full((4, 4), float("nan"))
    with pytest.warns(UserWarning, match="skipped a step"):
        opt.step()
    # skipped on the device: nothing applied (the state exists, at step 0, with zero momentum)
    assert torch.equal(w, before) and opt.skipped_steps == 1
    assert opt.state[w]["step"].item() == 0 and not opt.state[w]["momentum_buffer"].any()
    w.grad = torch.randn(4, 4)
    opt.step()
    assert torch.isfinite(w).all() and not torch.equal(w, before)


def test_bad_hyperparameters_are_refused():
    w = nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match=r"power must be in \[0, 1\]"):
        HTMuon([w], power=-0.5)
    with pytest.raises(ValueError, match=r"power must be in \[0, 1\]"):
        HTMuon([w], power=2)
    with pytest.raises(ValueError, match="unknown spectral method 'lanczos'"):
        HTMuon([w], method="lanczos")
    with pytest.raises(ValueError, match="needs power=0"):
        HTMuon([w], method="ns5", power=0.125)
    with pytest.raises(ValueError, match="nonfinite"):
        HTMuon([w], nonfinite="ignore")
    with pytest.raises(ValueError, match="interval"):
        HTMuon([w], interval=0)
    with pytest.raises(ValueError, match="empty parameter list"):
        HTMuon([])
    with pytest.raises(ValueError, match="needs a >= 2-D weight"):
        opt = HTMuon([{"params": [nn.Parameter(torch.randn(3))], "htmuon": True}])
        opt.param_groups[0]["params"][0].grad = torch.randn(3)
        opt.step()


def test_a_group_mixing_devices_is_refused():
    cpu = nn.Parameter(torch.randn(4, 4))
    meta = nn.Parameter(torch.empty(4, 4, device="meta"))
    with pytest.raises(ValueError, match=r"mixes devices \['cpu', 'meta'\]"):
        HTMuon([cpu, meta])
