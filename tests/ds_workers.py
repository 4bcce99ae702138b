"""DeepSpeed ZeRO workers for the multi-rank tests (importable by spawned ranks).

Every worker runs on one gloo rank that :func:`multirank.run_ranks` has already initialised;
DeepSpeed picks that process group up. ``DS_ACCELERATOR=cpu`` must be set before deepspeed is
imported, which :func:`_deepspeed` does.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch

from dist_models import make_batches
from htmuon_dist import HTMuon, param_groups
from tiny_llama import tiny_llama

PER_RANK_BATCH = 2
# Three layers: with two, ZeRO's even split at W=2 falls exactly between layer 0 and layer 1
# (both conventions), and no matrix would straddle a partition boundary.
LAYERS = 3


def build(seed: int = 0) -> torch.nn.Module:
    return tiny_llama(seed=seed, layers=LAYERS)


def reference_run(world: int, steps: int, accum: int, opt_kwargs: dict, seed: int = 0,
                  convention: str = "reference", clip: float = 0.0) -> dict[str, torch.Tensor]:
    """The single-process HTMuon run that every ZeRO run must reproduce."""
    model = build(seed)
    opt = HTMuon(param_groups(model, convention), process_group=None, **opt_kwargs)
    for micro_batches in make_batches("llama", steps, accum, PER_RANK_BATCH * world, seed):
        for x in micro_batches:
            # the mean over the global batch = the mean of the equal-sized per-rank means
            (model(input_ids=x, labels=x).loss / accum).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _deepspeed():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    return deepspeed


def ds_config(stage: int, world: int, accum: int = 1, bf16: bool = False, **zero_extra: Any) -> dict:
    """A DeepSpeed config for the tiny LLaMA: no optimizer block (HTMuon is the client
    optimizer), no clipping (the reference does not clip), reduce_scatter on."""
    zero = {"stage": stage, "reduce_scatter": True, "overlap_comm": False, "contiguous_gradients": True}
    if stage == 3:
        # Partition every parameter (the default keeps small ones whole) and cut each param
        # group into several sub-groups, i.e. several flat partitions and step() calls.
        zero.update(stage3_param_persistence_threshold=0, sub_group_size=6000)
    zero.update(zero_extra)
    cfg = {
        "train_micro_batch_size_per_gpu": PER_RANK_BATCH,
        "gradient_accumulation_steps": accum,
        "train_batch_size": PER_RANK_BATCH * accum * world,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if bf16:
        cfg["bf16"] = {"enabled": True}
    return cfg


def make_optimizer(model: torch.nn.Module, opt_kwargs: dict, convention: str = "reference") -> HTMuon:
    return HTMuon(param_groups(model, convention), **opt_kwargs)


def full_fp32_params(engine) -> dict[str, torch.Tensor]:
    """Every parameter's fp32 master copy, whole, by name (collective at ZeRO-3)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {n: safe_get_full_fp32_param(p).detach().clone().float()
            for n, p in engine.module.named_parameters()}


def layouts_of(opt: HTMuon) -> list[tuple[tuple[int, int], tuple]]:
    """(shape, per-rank ranges) of every matrix, over all of HTMuon's ZeRO engines."""
    return [(l.shape, l.ranges) for mset in opt.matrix_sets for l in mset.engine.layouts]


def zero_worker(rank: int, world: int, stage: int, steps: int, accum: int, opt_kwargs: dict,
                bf16: bool = False, save_dir: Optional[str] = None, save_at: Optional[int] = None,
                resume: bool = False, seed: int = 0, convention: str = "reference",
                callable_optimizer: bool = False) -> dict:
    """Trains the tiny LLaMA ``steps`` optimizer steps under ZeRO ``stage`` with HTMuon.

    With ``save_at=k`` and ``save_dir``: saves a checkpoint after step k and carries on (the
    run stays the uninterrupted reference). With ``resume``: loads that checkpoint first and
    runs steps k..steps-1 (k from the checkpoint's client state)."""
    deepspeed = _deepspeed()
    model = build(seed)
    if bf16:
        model = model.to(torch.bfloat16)
    cfg = ds_config(stage, world, accum, bf16)
    if callable_optimizer:  # DeepSpeed calls it with the model's parameters; route by name
        optimizer = lambda params: make_optimizer(model, opt_kwargs, convention)  # noqa: E731
    else:
        optimizer = make_optimizer(model, opt_kwargs, convention)
    engine, ds_opt, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg)
    opt = engine.basic_optimizer
    first = 0
    if resume:
        _, client = engine.load_checkpoint(save_dir, tag="ckpt")
        first = int(client["next_step"])
    batches = make_batches("llama", steps, accum, PER_RANK_BATCH * world, seed)
    lo, hi = rank * PER_RANK_BATCH, (rank + 1) * PER_RANK_BATCH
    sent, losses = [], []
    for step in range(first, steps):
        for x in batches[step]:
            loss = engine(input_ids=x[lo:hi], labels=x[lo:hi]).loss
            engine.backward(loss)
            engine.step()
        losses.append(float(loss.detach()))
        sent.append(opt.comm_bytes_last_step)
        if save_at is not None and step + 1 == save_at:
            engine.save_checkpoint(save_dir, tag="ckpt", client_state={"next_step": step + 1})
    return {
        "params": full_fp32_params(engine),
        "sent": sent,
        "losses": losses,
        "layouts": layouts_of(opt),
        "backend": getattr(opt, "backend", None),
        "n_engines": len(opt.matrix_sets),
        "opt_type": type(opt).__name__,
        "group_keys": [sorted(k for k in g if k != "params") for g in opt.param_groups],
        "momentum_keys": sorted({k for st in opt.state.values() for k in st}),
        "first_step": first,
        "row_states": row_states_of(opt),
    }


def row_states_of(opt: HTMuon) -> dict[str, torch.Tensor]:
    """NorMuon's flat v per ZeRO partition (rows of its matrices in order), keyed by the name
    of the partition's first matrix (empty without normuon)."""
    by_id = {id(p): st for p, st in opt.state.items()}
    out = {}
    for mset in opt.matrix_sets:
        flat, first_name = mset.entries[0].param, mset.entries[0].name
        if "normuon_v" in by_id.get(id(flat), {}):
            out[first_name] = by_id[id(flat)]["normuon_v"].detach().clone()
    return out


def expect_error_worker(rank: int, world: int, case: str) -> str:
    """Builds a misconfigured DeepSpeed run and returns the error text (or 'no error')."""
    deepspeed = _deepspeed()
    from htmuon_dist.integrations.deepspeed import check_config

    model = build()
    opt = make_optimizer(model, dict(lr=0.02))
    cfg = ds_config(2, world)
    try:
        if case == "optimizer_block":
            cfg["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-3}}
            check_config(cfg, opt)
        elif case == "muon_block":  # raw deepspeed.initialize: DeepSpeed tags use_muon itself
            cfg["optimizer"] = {"type": "Muon", "params": {"lr": 1e-3}}
            engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
            x = torch.randint(0, 128, (2, 12))
            engine.backward(engine(input_ids=x, labels=x).loss)
            engine.step()
        elif case == "offload":
            cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
            cfg["zero_force_ds_cpu_optimizer"] = False
            engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
            x = torch.randint(0, 128, (2, 12))
            engine.backward(engine(input_ids=x, labels=x).loss)
            engine.step()
        elif case == "fp16":
            cfg["fp16"] = {"enabled": True}
            check_config(cfg, opt)
        elif case == "accumulation":
            cfg["train_batch_size"] = PER_RANK_BATCH * 3 * world
            check_config(cfg, opt, world_size=world)
        else:
            raise ValueError(case)
    except Exception as exc:  # noqa: BLE001 - the message is the result
        return f"{type(exc).__name__}: {exc}"
    return "no error"


# -- the `accelerate launch` entry point (tests/test_deepspeed.py runs this file as a script) --


def accelerate_main(steps: int, accum: int, out: str, opt_kwargs: dict) -> None:
    """One training run through ``Accelerator.prepare`` with the DeepSpeed plugin that
    ``accelerate launch --use_deepspeed --deepspeed_config_file ...`` set up; rank 0 saves the
    fp32 master weights and the per-step traffic to ``out``."""
    from accelerate import Accelerator

    import torch.distributed as dist

    accelerator = Accelerator(gradient_accumulation_steps=accum)
    # Accelerate's bookkeeping is off under DeepSpeed on the CPU: it reports num_processes=1
    # and process_index=0 on every rank (torch.distributed has the real ones), and so fills
    # train_batch_size "auto" with micro x accumulation x 1, which DeepSpeed then rejects.
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != accelerator.num_processes:
        accelerator.state.deepspeed_plugin.deepspeed_config["train_batch_size"] = (
            PER_RANK_BATCH * accum * world)
    if accelerator.state.deepspeed_plugin.zero3_init_flag:
        # transformers builds under deepspeed.zero.Init: parameters are partitioned (1-D,
        # ds_shape holds the real shape) before HTMuon and param_groups() ever see them.
        from transformers import LlamaForCausalLM

        import deepspeed

        reference = build(0)
        model = LlamaForCausalLM._from_config(reference.config)
        assert hasattr(next(model.parameters()), "ds_shape"), "zero.Init was not active"
        # zero.Init draws the initial weights differently: load the reference's, as a user
        # loads pretrained weights into a partitioned model.
        init = dict(reference.named_parameters())
        for name, p in model.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if rank == 0:
                    p.data.copy_(init[name].data)
    else:
        model = build(0)
    opt = make_optimizer(model, opt_kwargs)  # checks Accelerate's DeepSpeed config here
    # A loader only tells Accelerate the micro-batch size ("auto" in the shipped configs); the
    # rows come from the same global batches as the reference, rank r taking its slice.
    loader = torch.utils.data.DataLoader(list(range(8)), batch_size=PER_RANK_BATCH)
    model, opt, _ = accelerator.prepare(model, opt, loader)
    inner = model.optimizer.optimizer if hasattr(model.optimizer, "optimizer") else model.optimizer
    htmuon = model.basic_optimizer
    lo, hi = rank * PER_RANK_BATCH, (rank + 1) * PER_RANK_BATCH
    sent = []
    for micro_batches in make_batches("llama", steps, accum, PER_RANK_BATCH * world, 0):
        for x in micro_batches:
            with accelerator.accumulate(model):
                loss = model(input_ids=x[lo:hi], labels=x[lo:hi]).loss
                accelerator.backward(loss)
                opt.step()
                opt.zero_grad()
        sent.append(htmuon.comm_bytes_last_step)
    params = full_fp32_params(model)
    clip = model.gradient_clipping()
    if rank == 0:
        torch.save({"params": params, "sent": sent, "clip": clip, "backend": htmuon.backend,
                    "type": type(htmuon).__name__, "zero_type": type(inner).__name__}, out)
    # Leave together and tear gloo down before interpreter exit: a rank that exits while the
    # other still has collectives in flight aborts ("terminate called without an active
    # exception") in about one run out of ten here.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    import json
    import sys

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    accelerate_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4]))
