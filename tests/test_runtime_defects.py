"""Defects of issue 20 in the optimizer's own API and its integrations, one test each; every
test here failed on the code before the fix (eba9aa5)."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

from htmuon_dist import HTMuon
from multirank import run_ranks


def test_a_string_lr_is_refused_naming_it():
    w = nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match="lr must be a number, got str '0.1'"):
        HTMuon([w], lr="0.1")
    with pytest.raises(ValueError, match="adamw_lr must be a number"):
        HTMuon([nn.Parameter(torch.randn(4))], adamw_lr="1e-3")


def test_a_complex_parameter_is_refused_at_construction():
    w = nn.Parameter(torch.randn(4, 4, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"params\[0\]: HTMuon does not support complex"):
        HTMuon([{"params": [w], "htmuon": True}])


def test_a_sparse_gradient_is_refused_before_anything_changes():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = HTMuon([{"params": [emb.weight], "htmuon": True, "param_names": ["emb.weight"]}])
    before = emb.weight.detach().clone()
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="emb.weight: HTMuon got a sparse gradient"):
        opt.step()
    assert torch.equal(emb.weight, before) and not opt.state


def test_a_wrong_shaped_momentum_is_refused_at_load():
    w = nn.Parameter(torch.randn(6, 4))
    opt = HTMuon([{"params": [w], "htmuon": True, "param_names": ["layer.w"]}])
    w.grad = torch.randn(6, 4)
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["momentum_buffer"] = torch.zeros(4, 6 + 1)
    with pytest.raises(ValueError, match="layer.w: the state 'momentum_buffer' being loaded has shape"):
        opt.load_state_dict(sd)


def _fake_fsdp1_worker(rank, world):
    """attach_fsdp1 a second time (after a re-wrap) must take effect at the next step: here
    the second registry says the matrix is an FSDP1 flat range, the first knew nothing."""
    import torch.distributed as dist

    from htmuon_dist import attach_fsdp1
    from htmuon_dist.distributed.backends import fsdp1

    w = nn.Parameter(torch.randn(6, 4))
    opt = HTMuon([{"params": [w], "htmuon": True}])
    w.grad = torch.randn(6, 4)
    fsdp1.collect = lambda model: {}  # the first wrap: nothing registered
    attach_fsdp1(opt, nn.Module())
    opt.step()
    first = opt.backend
    registry = {id(w): fsdp1.FlatRange((6, 4), 0, 24, dist.group.WORLD)}
    fsdp1.collect = lambda model: registry  # the re-wrap
    attach_fsdp1(opt, nn.Module())
    w.grad = torch.randn(6, 4)
    opt.step()
    return first, opt.backend


def test_attach_fsdp1_again_after_a_rewrap_is_not_ignored():
    (first, second), = run_ranks(_fake_fsdp1_worker, 1)
    assert first == "replicated" and second == "fsdp1"


def test_a_bug_inside_accelerate_state_is_not_swallowed(monkeypatch):
    """A broken Accelerate state must not silently switch the DeepSpeed guards off."""
    from htmuon_dist.integrations import deepspeed as ds

    class Broken:
        _shared_state = {"x": 1}

        @property
        def deepspeed_plugin(self):
            raise RuntimeError("a bug in the state")

    fake = types.ModuleType("accelerate.state")
    fake.AcceleratorState = Broken  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "accelerate", types.ModuleType("accelerate"))
    monkeypatch.setitem(sys.modules, "accelerate.state", fake)
    with pytest.raises(RuntimeError, match="a bug in the state"):
        ds.check_accelerate(None)

    class NoDeepSpeed:
        _shared_state = {"x": 1}

        @property
        def deepspeed_plugin(self):
            raise AttributeError("deepspeed_plugins")

    fake.AcceleratorState = NoDeepSpeed  # type: ignore[attr-defined]
    assert ds.check_accelerate(None) is None  # no DeepSpeed in Accelerate: nothing to check
