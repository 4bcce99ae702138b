"""GPU runners: sharded HTMuon over NCCL equals the single-process optimizer, and the CUDA-stream
path of spectral_power_groups equals the sequential calls.

    pytest -m gpu tests/test_gpu.py        # on a machine with >= 1 CUDA GPU (W = 2..#GPUs need >= 2)

Every test here needs CUDA and is skipped without it (two NCCL ranks cannot share one GPU, so the
equivalence runs at W = 2..torch.cuda.device_count()). Tolerance 1e-4 relative per parameter:
the reference runs on the same GPU, and the residual is the backends' different summation order.
"""

from __future__ import annotations

import datetime
import os
import pickle
import tempfile
import traceback

import pytest
import torch

pytestmark = pytest.mark.gpu
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
needs_cuda = pytest.mark.skipif(GPUS < 1, reason="needs a CUDA GPU")
WORLDS = list(range(2, max(GPUS, 2) + 1)) if GPUS >= 2 else [2]
TOL = 1e-4
OPT = dict(lr=0.02, power=0.125, weight_decay=0.1, adamw_lr=3e-3, adamw_weight_decay=0.01)
PER_RANK_BATCH = 2


def _nccl_worker(rank, world, port, out_dir, backend, steps):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import torch.distributed as dist

    try:
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120),
                                device_id=torch.device("cuda", rank))
        result = ("ok", _train(rank, world, backend, steps))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        result = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def _train(rank, world, backend, steps):
    from dist_models import build, full_state, loss_fn, make_batches
    from htmuon_dist import HTMuon, attach_fsdp1, param_groups

    device = torch.device("cuda", rank)
    model = build("llama", 0).to(device)
    if backend == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
        wrapped, groups = model, param_groups(model, "reference")
    elif backend == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        groups = param_groups(model, "reference")
        wrapped = FSDP(model, use_orig_params=True, auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
                       device_id=device)
    else:
        from torch.nn.parallel import DistributedDataParallel as DDP

        groups = param_groups(model, "reference")
        wrapped = DDP(model, device_ids=[rank])
    opt = HTMuon(groups, **OPT)
    if backend == "fsdp1":
        attach_fsdp1(opt, wrapped)
    lo, hi = rank * PER_RANK_BATCH, (rank + 1) * PER_RANK_BATCH
    for (x,) in make_batches("llama", steps, 1, PER_RANK_BATCH * world, 0):
        loss_fn("llama", wrapped, x[lo:hi].to(device)).backward()
        opt.step()
        opt.zero_grad()
    state = {n: p.cpu() for n, p in full_state(wrapped, backend).items()}
    return {"params": state, "backend": opt.backend}


def _reference(world, steps):
    from dist_models import build, loss_fn, make_batches
    from htmuon_dist import HTMuon, param_groups

    model = build("llama", 0).cuda()
    opt = HTMuon(param_groups(model, "reference"), **OPT, process_group=None)
    for (x,) in make_batches("llama", steps, 1, PER_RANK_BATCH * world, 0):
        loss_fn("llama", model, x.cuda()).backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach().cpu() for n, p in model.named_parameters()}


def run_nccl(world, backend, steps, timeout=300):
    import torch.multiprocessing as mp

    from multirank import free_port

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out_dir:
        port = free_port()
        procs = [ctx.Process(target=_nccl_worker, args=(r, world, port, out_dir, backend, steps)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        for p in procs:
            if p.is_alive():
                p.kill()
        results = []
        for r in range(world):
            path = os.path.join(out_dir, f"rank{r}.pkl")
            assert os.path.exists(path), f"rank {r} died (exit code {procs[r].exitcode})"
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            assert status == "ok", f"rank {r}: {value}"
            results.append(value)
    return results


@needs_cuda
@pytest.mark.skipif(GPUS < 2, reason="NCCL needs one GPU per rank: W >= 2 needs >= 2 GPUs")
@pytest.mark.parametrize("backend", ["fsdp2", "fsdp1", "ddp"])
@pytest.mark.parametrize("world", WORLDS)
def test_nccl_sharded_equals_single_process(backend, world):
    steps = 3
    want = _reference(world, steps)
    for r in run_nccl(world, backend, steps):
        worst = max(float((r["params"][n].double() - w.double()).norm() / w.double().norm().clamp_min(1e-30))
                    for n, w in want.items())
        assert worst <= TOL, f"{backend} W={world}: worst relative parameter error {worst:.2e}"


@needs_cuda
def test_cuda_stream_groups_equal_the_sequential_calls():
    from htmuon_dist.spectral import spectral_power
    from htmuon_dist.spectral.grouped import spectral_power_groups

    g = torch.Generator(device="cuda").manual_seed(0)
    jobs = [(torch.randn(3, 512, 256, device="cuda", generator=g), 0.125, "eigh", None),
            (torch.randn(256, 700, device="cuda", generator=g), 0.125, "gram32", None),
            (torch.randn(2, 384, 384, device="cuda", generator=g), 0.3, "tracked_ns", None),
            (torch.randn(640, 256, device="cuda", generator=g).bfloat16(), 0.0, "ns5", None)]
    want = [spectral_power(x, p, method=m, rtol=r) for x, p, m, r in jobs]
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):  # the caller's stream need not be the default one
        got = spectral_power_groups(jobs, streams=3)
        got = [y.clone() for y in got]  # used on the caller's stream right away
    torch.cuda.synchronize()
    for g_, w in zip(got, want):
        assert g_.shape == w.shape and g_.dtype == w.dtype
        torch.testing.assert_close(g_.float(), w.float(), rtol=1e-5, atol=1e-6)
