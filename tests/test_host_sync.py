"""A steady-state HTMuon.step() reads no tensor value on the host and issues no collective
but the exchange's all_to_all: one process, FSDP2 x2, DDP x2 and DeepSpeed ZeRO-2 x2.

The harness lives here, outside the library: it patches every torch.Tensor method that copies
values to the host (each one a device synchronisation on a GPU) and every torch.distributed
collective, and counts the calls made while ``HTMuon.step`` runs at steps 3-6 (after the plan
was built and checked at the first step). Nothing is allow-listed.
"""

from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch
import torch.distributed as dist

from dist_models import build, loss_fn, make_batches, wrap
from htmuon_dist import HTMuon, param_groups
from multirank import run_ranks
from test_distributed import OPT, PER_RANK_BATCH

_HOST_READS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__",
               "__complex__", "__array__")
_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor",
                "reduce_scatter", "reduce_scatter_tensor", "broadcast", "broadcast_object_list",
                "barrier", "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv",
                "gather", "scatter", "reduce", "monitored_barrier", "batch_isend_irecv")


class Counter:
    """Counts host reads of tensor values and collectives while active."""

    def __init__(self) -> None:
        self.reads: list[str] = []
        self.collectives: list[str] = []
        self.on = False

    def install(self) -> "Counter":
        self.saved_t = {n: getattr(torch.Tensor, n) for n in _HOST_READS}
        for name, original in self.saved_t.items():
            def read(t, *a, _n=name, _o=original, **k):
                if self.on:
                    self.reads.append(_n)
                return _o(t, *a, **k)
            setattr(torch.Tensor, name, read)
        # .cpu() / .to("cpu") of a device tensor (on a CPU run there is no device to copy from)
        self.saved_cpu = torch.Tensor.cpu
        self.saved_to = torch.Tensor.to

        def cpu(t, *a, **k):
            if self.on and t.device.type != "cpu":
                self.reads.append("cpu")
            return self.saved_cpu(t, *a, **k)

        def to(t, *a, **k):
            target = a[0] if a else k.get("device")
            if self.on and t.device.type != "cpu" and str(target).startswith("cpu"):
                self.reads.append("to(cpu)")
            return self.saved_to(t, *a, **k)

        torch.Tensor.cpu, torch.Tensor.to = cpu, to  # type: ignore[method-assign]
        self.saved_d = {n: getattr(dist, n) for n in _COLLECTIVES if hasattr(dist, n)}
        for name, original in self.saved_d.items():
            def coll(*a, _n=name, _o=original, **k):
                if self.on:
                    self.collectives.append(_n)
                return _o(*a, **k)
            setattr(dist, name, coll)
        return self

    def uninstall(self) -> None:
        for name, original in self.saved_t.items():
            setattr(torch.Tensor, name, original)
        torch.Tensor.cpu, torch.Tensor.to = self.saved_cpu, self.saved_to  # type: ignore[method-assign]
        for name, original in self.saved_d.items():
            setattr(dist, name, original)


def _counted_steps(opt: HTMuon, run_step, steps: int = 6, first_counted: int = 3) -> list[dict]:
    """Runs ``run_step(k)`` for k < steps, counting inside ``opt.step`` from ``first_counted``."""
    counter = Counter().install()
    inner = opt.step
    per_step: list[dict] = []

    def step(*a, **k):
        counter.on = True
        try:
            return inner(*a, **k)
        finally:
            counter.on = False

    opt.step = step  # type: ignore[method-assign]
    try:
        for k in range(steps):
            counter.reads, counter.collectives = [], []
            run_step(k)
            if k + 1 >= first_counted:
                per_step.append({"reads": counter.reads, "collectives": sorted(set(counter.collectives)),
                                 "n_collectives": len(counter.collectives)})
    finally:
        opt.step = inner  # type: ignore[method-assign]
        counter.uninstall()
    return per_step


def torch_worker(rank, world, backend, method="eigh", normuon=False):
    model = build("llama")
    wrapped = wrap(model, "llama", backend)
    opt = HTMuon(param_groups(model, "muon"), **dict(OPT, method=method, normuon=normuon))
    lo, hi = rank * PER_RANK_BATCH, (rank + 1) * PER_RANK_BATCH
    batches = make_batches("llama", 6, 1, PER_RANK_BATCH * world)

    def run_step(k):
        loss_fn("llama", wrapped, batches[k][0][lo:hi]).backward()
        opt.step()
        opt.zero_grad()

    per_step = _counted_steps(opt, run_step)
    buckets = len(opt.engine.plan.buckets)
    return per_step, buckets


def zero2_worker(rank, world):
    from ds_workers import _deepspeed, ds_config, make_optimizer
    from ds_workers import build as ds_build

    deepspeed = _deepspeed()
    model = ds_build(0)
    opt = make_optimizer(model, dict(OPT))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(2, world, 1))
    batches = make_batches("llama", 6, 1, PER_RANK_BATCH * world)
    lo, hi = rank * PER_RANK_BATCH, (rank + 1) * PER_RANK_BATCH
    ht = engine.basic_optimizer

    def run_step(k):
        x = batches[k][0][lo:hi]
        engine.backward(engine(input_ids=x, labels=x).loss)
        engine.step()

    per_step = _counted_steps(ht, run_step)
    return per_step, sum(len(s.engine.plan.buckets) for s in ht.matrix_sets)


def _assert_clean(per_step, world, buckets):
    for k, counts in enumerate(per_step):
        assert counts["reads"] == [], f"step {k + 3}: host reads {counts['reads']}"
        if world == 1:
            assert counts["n_collectives"] == 0, counts
        else:
            assert counts["collectives"] == ["all_to_all_single"], counts
            # one gather and one scatter per bucket, nothing else
            assert counts["n_collectives"] == 2 * buckets, counts


@pytest.mark.parametrize("method,normuon", [("eigh", False), ("stream", False), ("eigh", True), ("fast_ns", False)])
def test_one_process_step_reads_nothing_on_the_host(method, normuon):
    per_step, buckets = torch_worker(0, 1, "none", method, normuon)
    _assert_clean(per_step, 1, buckets)


@pytest.mark.multirank
@pytest.mark.parametrize("backend,method", [("fsdp2", "eigh"), ("ddp", "eigh"), ("fsdp2", "stream"), ("fsdp2", "fast_ns")])
def test_two_rank_step_reads_nothing_and_only_exchanges(backend, method):
    for per_step, buckets in run_ranks(torch_worker, 2, backend, method):
        _assert_clean(per_step, 2, buckets)


@pytest.mark.multirank
def test_zero2_step_reads_nothing_and_only_exchanges():
    pytest.importorskip("deepspeed")
    for per_step, buckets in run_ranks(zero2_worker, 2, timeout=600):
        _assert_clean(per_step, 2, buckets)


def test_the_counter_sees_a_hidden_sync_and_a_collective():
    """The harness is not blind: an .item(), a bool() and a tolist() are caught."""
    counter = Counter().install()
    try:
        counter.on = True
        t = torch.ones(3)
        t.sum().item()
        bool(t.all())
        t.tolist()
        counter.on = False
    finally:
        counter.uninstall()
    assert counter.reads == ["item", "__bool__", "tolist"]


def test_the_old_runtime_would_have_been_caught():
    """A check every step (check_every=1, the debug setting) reads the host: counted."""
    w = torch.nn.Parameter(torch.randn(6, 4))
    opt = HTMuon([{"params": [w], "htmuon": True}], check_every=1)

    def run_step(k):
        w.grad = torch.randn(6, 4)
        opt.step()

    per_step = _counted_steps(opt, run_step, steps=4)
    assert all(counts["reads"] for counts in per_step), per_step
