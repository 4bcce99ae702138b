"""The pretraining loop behind ``accelerate launch launch/train.py``.

Per optimizer step every rank runs ``accum`` micro-batches of ``micro_batch_size`` sequences;
gradients are reduced across ranks on the last one only. The loss is the mean over all target
tokens of the step on all ranks (exact also when padding makes ranks' token counts differ).
Exactly ``max_steps`` optimizer steps run; evaluation averages the loss over the tokens of a
fixed validation budget (sum of token losses / number of tokens, over all ranks).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import checkpoint as ckpt
from .config import Config, ConfigError, resolve, size_key
from .data import TokenStream, eval_batches, load_documents, load_tokenizer
from .metrics import MetricsWriter, plot_losses
from .model import build_model, count_parameters, describe, export_pretrained, load_llama_config, materialize
from .optim import build_optimizer, build_scheduler, matrix_names
from .parallel import apply_fsdp1, apply_fsdp2, clip_grad_norm, detect_strategy, set_gradient_sync


def _all_reduce(values: list[float], device: torch.device, op=None) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()


def token_loss_sum(model, batch: dict[str, torch.Tensor], packed: bool) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropies over the batch (fp32) and the number of targets."""
    kwargs = {} if packed else {"attention_mask": batch["attention_mask"]}
    logits = model(input_ids=batch["input_ids"], use_cache=False, **kwargs).logits
    targets = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=-100, reduction="sum")
    return loss, int((targets != -100).sum())


@torch.no_grad()
def evaluate(model, batches: list[dict[str, torch.Tensor]], n_batches: int, packed: bool, device, autocast) -> tuple[float, int]:
    """Token-averaged validation loss over all ranks. Every rank runs ``n_batches`` forwards
    (sharded models need all ranks in each forward); missing batches contribute nothing."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    dummy = {k: v.clone() for k, v in batches[0].items()}
    dummy["labels"].fill_(-100)
    for i in range(n_batches):
        batch = batches[i] if i < len(batches) else dummy
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            loss, n = token_loss_sum(model, batch, packed)
        total += float(loss)
        count += n
    total, count = _all_reduce([total, float(count)], device)
    model.train(was_training)
    return total / max(count, 1.0), int(count)


def _trainer_state(cfg: Config, model_cfg, strategy: str, world: int, step: int, tokens: int) -> dict[str, Any]:
    return {
        "step": step, "tokens": tokens, "model": describe(model_cfg), "optimizer": cfg.train.optimizer,
        "checkpoint_format": "sharded" if strategy in ("fsdp1", "fsdp2") else f"accelerate-{strategy}",
        "world_size": world, "config": cfg.to_dict(),
    }


def run(cfg: Config) -> dict[str, Any]:
    """Trains, evaluates, checkpoints and exports; returns the summary (on every rank)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    t, d, m = cfg.train, cfg.data, cfg.model
    cuda = torch.cuda.is_available()
    bf16 = t.mixed_precision == "bf16" or (t.mixed_precision == "auto" and cuda and torch.cuda.is_bf16_supported())
    if bf16 and not cuda:
        raise ConfigError("--mixed_precision bf16 needs a GPU (this CPU has no bf16 arithmetic); use --mixed_precision no")
    strategy = detect_strategy(t.parallel, int(os.environ.get("WORLD_SIZE", "1")))
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    if strategy in ("fsdp1", "fsdp2", "ddp") and world_env < 2:
        # One process: nothing to shard or replicate, and the code path is the plain one.
        strategy = "none"
    # Accelerate's own mixed precision only for the models it wraps; FSDP gets a policy instead.
    accel_mp = "bf16" if bf16 and strategy in ("none", "ddp", "deepspeed") else "no"
    cfg, accum = resolve(cfg, world_env)
    # FSDP is applied by us (parallel.py): hide the accelerate config's FSDP flag so Accelerate
    # builds a plain DDP-style state (its FSDP plugin would refuse the CPU or wrap the model).
    hidden = os.environ.pop("ACCELERATE_USE_FSDP", None) if strategy in ("fsdp1", "fsdp2", "none") else None
    try:
        accelerator = Accelerator(cpu=not cuda, mixed_precision=accel_mp,
                                  gradient_accumulation_steps=accum if strategy == "deepspeed" else 1)
    finally:
        if hidden is not None:
            os.environ["ACCELERATE_USE_FSDP"] = hidden
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    if world != world_env:
        raise RuntimeError(f"WORLD_SIZE={world_env} but Accelerate sees {world} processes")
    is_main = accelerator.is_main_process
    out = Path(t.output_dir)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    set_seed(t.seed)
    import datasets

    datasets.disable_progress_bars()  # one bar per run is enough: ours

    # -- tokenizer, model, optimizer ---------------------------------------------------------
    with accelerator.local_main_process_first():  # builds the offline corpus/tokenizer cache once per node
        tokenizer = load_tokenizer(d)
    model_cfg = load_llama_config(m, len(tokenizer))
    if d.seq_len > model_cfg.max_position_embeddings:
        raise ConfigError(f"--seq_len {d.seq_len} exceeds the model's max_position_embeddings {model_cfg.max_position_embeddings}")
    n_params = count_parameters(model_cfg)
    # Build on the meta device when FSDP2 will shard it: no rank ever holds the whole model.
    on_meta = strategy == "fsdp2"
    act_ckpt = m.activation_checkpointing or os.environ.get("FSDP_ACTIVATION_CHECKPOINTING", "false").lower() == "true"
    model = build_model(model_cfg, on_meta=on_meta, activation_checkpointing=act_ckpt,
                        zero3_aware=strategy == "deepspeed")
    if t.param_dtype == "bf16":  # the reference's pure-bf16 run: weights, grads, optimizer states
        if strategy == "deepspeed":
            raise ConfigError("--param_dtype bf16 is not supported with DeepSpeed: pass --param_dtype fp32 (c4_reference.yaml sets bf16) and enable bf16 in the DeepSpeed config")
        for p in model.parameters():  # before wrapping/materialising: shards and init follow;
            p.data = p.data.to(torch.bfloat16)  # buffers (rotary tables) stay fp32
    routed = matrix_names(model, t.param_convention) if t.optimizer != "adamw" else matrix_names(model, "reference")
    std = model_cfg.initializer_range
    if strategy == "deepspeed":
        pass  # ZeRO-3 may have partitioned the parameters at construction: keep HF's N(0, std) init
    elif strategy == "fsdp2":
        reshard = t.fsdp_reshard_after_forward
        if reshard is None:
            reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() in ("true", "1", "full_shard")
        model = apply_fsdp2(model, device, bf16, reshard)
        materialize(model, device, t.seed, std)
    else:
        materialize(model, device, t.seed, std)
        if strategy == "fsdp1":
            model = apply_fsdp1(model, device, bf16)
    optimizer = build_optimizer(model, t, routed)
    if strategy == "fsdp1" and t.optimizer != "adamw":
        from htmuon_dist import attach_fsdp1

        attach_fsdp1(optimizer, model)
    scheduler = build_scheduler(optimizer, t)
    self_managed = strategy in ("fsdp1", "fsdp2")
    if not self_managed:
        if strategy == "deepspeed":
            ds = accelerator.state.deepspeed_plugin.deepspeed_config
            ds["train_micro_batch_size_per_gpu"] = t.micro_batch_size
            ds["train_batch_size"] = t.total_batch_size
            ds["gradient_clipping"] = t.grad_clip
        model, optimizer = accelerator.prepare(model, optimizer)
    # Not prepared: an AcceleratedScheduler would step once per process.
    accelerator.register_for_checkpointing(scheduler)
    from torch.distributed.tensor import DTensor

    # Recorded in summary.json: the tests check that FSDP2 really sharded every parameter.
    param_kinds = {"tensors": 0, "dtensors": 0}
    for p in model.parameters():
        param_kinds["tensors"] += 1
        param_kinds["dtensors"] += isinstance(p, DTensor)

    # -- data ---------------------------------------------------------------------------------
    train_docs = load_documents(d, "train", rank, world, t.seed)
    stream = TokenStream(train_docs, tokenizer, d, t.micro_batch_size, model_cfg.vocab_size, seed=t.seed)
    val_docs = load_documents(d, "validation", rank, world, t.seed)
    per_rank = math.ceil(d.eval_tokens / world)
    evals = eval_batches(val_docs, tokenizer, d, t.micro_batch_size, model_cfg.vocab_size, per_rank)
    if not evals:
        raise ConfigError("the validation split of this rank is empty; use fewer processes or more validation data")
    n_eval_batches = int(_all_reduce([len(evals)], device, dist.ReduceOp.MAX if world > 1 else None)[0])
    eval_available = int(_all_reduce([sum(int((b["labels"][:, 1:] != -100).sum()) for b in evals)], device)[0])
    if is_main and eval_available < d.eval_tokens:
        print(f"note: evaluating on {eval_available:,} validation tokens: some rank's validation shard "
              f"holds fewer than its share of --eval_tokens {d.eval_tokens:,}", flush=True)

    # -- resume -------------------------------------------------------------------------------
    step, tokens = 0, 0
    resume_from = ckpt.find_resume(out, t.resume)
    expected = _trainer_state(cfg, model_cfg, strategy, world, 0, 0)
    if resume_from is not None:
        state = ckpt.check_compatible(resume_from, expected)
        data_state = ckpt.load(accelerator, resume_from, model, optimizer, strategy)
        stream.load_state_dict(data_state)
        step, tokens = int(state["step"]), int(state["tokens"])
    writer = MetricsWriter(out, t.report_to, is_main, t.run_name, cfg.to_dict(), resumed_step=step)
    if is_main:
        for msg in writer.messages:
            print(msg, flush=True)
        print(
            f"htmuon-train: {size_key(m.model)} LLaMA ({n_params / 1e6:.1f}M params), {t.optimizer} "
            f"lr {t.lr:g}, {strategy} x {world} ({device.type}, {'bf16' if bf16 else 'fp32'}), "
            f"batch {t.total_batch_size} = {t.micro_batch_size} x {accum} accum x {world}, seq {d.seq_len}, "
            f"{t.max_steps} steps" + (f", resumed at step {step} from {resume_from}" if resume_from else ""),
            flush=True,
        )
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    def autocast():
        return accelerator.autocast() if accel_mp != "no" else torch.autocast(device.type, enabled=False)

    def save_checkpoint(at: int) -> None:
        ckpt.save(accelerator, out, at, model, optimizer, strategy, stream.state_dict(),
                  _trainer_state(cfg, model_cfg, strategy, world, at, tokens), t.save_total_limit)

    esd = None
    if t.esd_steps and strategy == "deepspeed":
        raise ConfigError("--esd_steps is not supported under DeepSpeed ZeRO; use FSDP2, FSDP1, DDP or one process, or --esd_steps 0")
    if t.esd_steps:  # ESD statistics, each matrix on its owner rank (docs/diagnostics.md)
        from htmuon_dist.diagnostics.monitor import EsdMonitor
        from .optim import clean_name

        esd = EsdMonitor(optimizer, model, routed, clean_name)

    # -- train ----------------------------------------------------------------------------------
    packed = d.packing
    last_step_s, window_tokens, window_start = 0.0, 0, time.perf_counter()
    eval_loss: Optional[float] = None
    run_start = time.perf_counter()
    start_step, start_tokens = step, tokens
    bar = tqdm(total=t.max_steps, initial=step, disable=not (is_main and t.progress_bar), unit="step", dynamic_ncols=True)
    batches = iter(stream)
    model.train()
    stop = t.stop_at_step or t.max_steps
    while step < stop:
        micro = [next(batches) for _ in range(accum)]
        local_targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        # Packed batches have the same token count on every rank; padded ones need the sum.
        global_targets = local_targets * world if packed else int(_all_reduce([local_targets], device)[0])
        # The backends average gradients over ranks, so divide by the mean per-rank count.
        denom = global_targets / world
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for i, batch in enumerate(micro):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with set_gradient_sync(model, strategy, i == accum - 1):
                with autocast():
                    loss, _ = token_loss_sum(model, batch, packed)
                scaled = loss / denom * (accum if strategy == "deepspeed" else 1)  # DeepSpeed divides by accum itself
                accelerator.backward(scaled)
            loss_sum += loss.detach().double()
        grad_norm = clip_grad_norm(model, strategy, t.grad_clip) if strategy != "deepspeed" else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += global_targets
        window_tokens += global_targets
        bar.update(1)

        if step % t.logging_steps == 0 or step == stop:
            step_loss = float(_all_reduce([float(loss_sum)], device)[0]) / global_targets
            elapsed = time.perf_counter() - window_start
            tps = window_tokens / max(elapsed, 1e-9)
            window_tokens, window_start = 0, time.perf_counter()
            row = {"step": step, "loss": step_loss, "lr": scheduler.get_last_lr()[0], "tokens": tokens, "tokens_per_s": tps}
            if grad_norm is not None:
                row["grad_norm"] = float(grad_norm)
            if not math.isfinite(step_loss):
                raise FloatingPointError(f"loss is {step_loss} at step {step}; lower --lr or raise --warmup_steps")
            writer.log(row)
            bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tps:,.0f}", lr=f"{row['lr']:.2e}", refresh=False)
        if esd is not None and (step % t.esd_steps == 0 or step == stop):
            writer.log(esd(step))
        if (t.eval_steps and step % t.eval_steps == 0) or step == t.max_steps:
            eval_loss, n_tok = evaluate(model, evals, n_eval_batches, packed, device, autocast)
            writer.log({"step": step, "eval_loss": eval_loss, "eval_ppl": math.exp(eval_loss), "eval_tokens": n_tok})
            if is_main:
                bar.write(f"step {step}: eval loss {eval_loss:.4f}, perplexity {math.exp(eval_loss):.2f} ({n_tok:,} tokens)")
        if (t.save_steps and step % t.save_steps == 0) or step == t.stop_at_step:
            save_checkpoint(step)
    bar.close()
    train_s = time.perf_counter() - run_start
    steps_run = step - start_step
    summary: dict[str, Any] = {
        "step": step, "stopped_early": step < t.max_steps, "train_seconds": round(train_s, 2),
        "steps_run": steps_run, "tokens": tokens,
        "tokens_per_s": (tokens - start_tokens) / max(train_s, 1e-9) if steps_run else None,
        "params": n_params, "optimizer": t.optimizer, "strategy": strategy, "world_size": world,
        "param_tensors": param_kinds["tensors"], "dtensor_params": param_kinds["dtensors"],
        "optimizer_class": type(getattr(optimizer, "optimizer", optimizer)).__name__,
        "param_dtypes": sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()}),
    }
    if eval_loss is not None:
        summary.update(eval_loss=eval_loss, eval_ppl=math.exp(eval_loss))
    if step < t.max_steps:
        if is_main:
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
        writer.close()
        return summary

    # -- export ---------------------------------------------------------------------------------
    if t.save_steps and step % t.save_steps:
        save_checkpoint(step)  # the final state is always resumable
    if t.export_model:
        export_dir = out / "final_model"
        full = _full_state_dict(accelerator, model, strategy)
        probe = evals[0]["input_ids"][:1, : min(32, d.seq_len)].to(device)
        model.eval()
        with torch.no_grad(), autocast():
            probe_logits = model(input_ids=probe, use_cache=False).logits.float().cpu()
        if is_main:
            export_pretrained(full, model_cfg, tokenizer, export_dir)
            torch.save({"input_ids": probe.cpu(), "logits": probe_logits}, export_dir / "probe_logits.pt")
            summary["export_dir"] = str(export_dir)
        accelerator.wait_for_everyone()
    if is_main:
        if t.plot:
            msg = plot_losses(out / "metrics.jsonl", out / "loss.png",
                              f"{size_key(m.model)} LLaMA, {t.optimizer}, {strategy} x {world}")
            print(msg or f"loss plot: {out / 'loss.png'}", flush=True)
        if t.plot and t.esd_steps:
            from htmuon_dist.diagnostics.plots import plot_alpha_over_steps

            msg = plot_alpha_over_steps(out / "metrics.jsonl", out / "esd_alpha.png",
                                        f"{size_key(m.model)} LLaMA, {t.optimizer}: ESD alpha per matrix type")
            print(msg or f"alpha plot: {out / 'esd_alpha.png'}", flush=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        if eval_loss is not None:
            print(f"final eval loss {eval_loss:.4f}, perplexity {math.exp(eval_loss):.2f}; "
                  f"{summary['tokens_per_s']:,.0f} tokens/s; {train_s:.1f} s for {steps_run} steps", flush=True)
    writer.close()
    return summary


def _full_state_dict(accelerator, model, strategy: str) -> dict[str, torch.Tensor]:
    """The whole model on the CPU of the main process (empty elsewhere). Collective."""
    if strategy == "deepspeed":
        return accelerator.get_state_dict(model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    distributed = dist.is_available() and dist.is_initialized()
    # FSDP1's rank-0 CPU offload segfaults on a CPU/gloo run (torch 2.13): there every rank
    # gathers the full model instead (FSDP1 is for models that fit anyway).
    offload = distributed and not (strategy == "fsdp1" and not torch.cuda.is_available())
    options = StateDictOptions(full_state_dict=True, cpu_offload=offload)
    sd = get_model_state_dict(model, options=options)
    return {k: v.detach().float().cpu().contiguous() if hasattr(v, "cpu") else v for k, v in sd.items()}
