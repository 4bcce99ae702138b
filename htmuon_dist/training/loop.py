"""The pretraining loop behind ``accelerate launch launch/train.py``.

Per optimizer step every rank runs ``accum`` micro-batches of ``micro_batch_size`` sequences;
gradients are reduced across ranks on the last one only. The loss is the mean over all target
tokens of the step on all ranks (exact also when padding makes ranks' token counts differ).
Exactly ``max_steps`` optimizer steps run; evaluation averages the loss over the tokens of a
fixed validation budget (sum of token losses / number of tokens, over all ranks).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import checkpoint as ckpt
from . import faults
from .config import Config, ConfigError, TrainArguments, resolve, size_key
from .data import TokenStream, eval_batches, load_documents, load_tokenizer
from .memory import malloc_trim, mmap_threshold_for, set_mmap_threshold
from .metrics import MetricsWriter, plot_losses
from .model import build_model, count_parameters, describe, export_pretrained, init_weights_, load_llama_config, materialize
from .optim import build_optimizer, build_scheduler, matrix_names, matrix_shape_counts, matrix_splits
from .preemption import PREEMPTED_EXIT, PreemptionWatch, process_group_kwargs, write_marker
from .step_batches import StepBatches
from .parallel import apply_fsdp1, apply_fsdp2, clip_grad_norm, detect_strategy, set_gradient_sync


def _client_optimizer(optimizer: Any) -> Any:
    """The optimizer the trainer built (HTMuon or AdamW) inside Accelerate's and DeepSpeed's
    wrappers (each keeps the one it wraps as ``.optimizer``)."""
    from htmuon_dist import HTMuon

    for _ in range(4):
        inner = getattr(optimizer, "optimizer", None)
        if isinstance(optimizer, HTMuon) or inner is None:
            break
        optimizer = inner
    return optimizer


def _htmuon_of(optimizer: Any) -> Any:
    """The HTMuon inside the wrappers, or None (AdamW)."""
    from htmuon_dist import HTMuon

    inner = _client_optimizer(optimizer)
    return inner if isinstance(inner, HTMuon) else None


def _all_reduce(values: list[float], device: torch.device, op=None) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()


def token_loss_sum(model, batch: dict[str, torch.Tensor], packed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropies over the batch (fp32, 0-d) and the number of targets
    (int64, 0-d), both left on the batch's device: reading them would synchronise."""
    kwargs = {} if packed else {"attention_mask": batch["attention_mask"]}
    logits = model(input_ids=batch["input_ids"], use_cache=False, **kwargs).logits
    targets = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=-100, reduction="sum")
    return loss, (targets != -100).sum()


@torch.no_grad()
def evaluate(model, batches: list[dict[str, torch.Tensor]], n_batches: int, packed: bool, device, autocast) -> tuple[float, int]:
    """Token-averaged validation loss over all ranks. Every rank runs ``n_batches`` forwards
    (sharded models need all ranks in each forward); missing batches contribute nothing."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    dummy = {k: v.clone() for k, v in batches[0].items()}
    dummy["labels"].fill_(-100)
    for i in range(n_batches):
        batch = batches[i] if i < len(batches) else dummy
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            loss, n = token_loss_sum(model, batch, packed)
        total += loss.detach().double()
        count += n.double()
    total, count = _all_reduce([float(total), float(count)], device)
    model.train(was_training)
    return total / max(count, 1.0), int(count)


def _trainer_state(cfg: Config, model_cfg, strategy: str, world: int, step: int, tokens: int) -> dict[str, Any]:
    return {
        "step": step, "tokens": tokens, "model": describe(model_cfg), "optimizer": cfg.train.optimizer,
        "checkpoint_format": "sharded" if strategy in ("fsdp1", "fsdp2") else f"accelerate-{strategy}",
        "world_size": world, "config": cfg.to_dict(),
    }


# --- the phases of a run ----------------------------------------------------------------------
# run() = setup_runtime -> build_model_and_optimizer -> prepare_data -> resume_state -> train
# -> finish. Each phase returns a small record; the loop itself (train) only reads them.


@dataclass
class Runtime:
    """Processes, devices and precision (phase 1). ``cfg`` is the resolved config."""

    cfg: Config
    accelerator: Any
    strategy: str
    world: int
    rank: int
    device: torch.device
    is_main: bool
    bf16: bool
    accel_mp: str
    accum: int
    out: Path

    def autocast(self):
        acc = self.accelerator
        return acc.autocast() if self.accel_mp != "no" else torch.autocast(self.device.type, enabled=False)


@dataclass
class Built:
    """Tokenizer, model, optimizer and schedule (phase 2)."""

    tokenizer: Any
    model_cfg: Any
    model: Any
    optimizer: Any
    scheduler: Any
    n_params: int
    param_kinds: dict[str, int]
    esd: Any = None  # --esd_steps: htmuon_dist.diagnostics.monitor.EsdMonitor
    matrix_shapes: Optional[dict[tuple[int, int], int]] = None  # (rows, cols) -> count of HTMuon's matrices


@dataclass
class DataPlan:
    """This rank's training stream and fixed validation batches (phase 3)."""

    stream: TokenStream
    evals: list[dict[str, torch.Tensor]]
    n_eval_batches: int


@dataclass
class Progress:
    """Where training stands; checkpointed (phase 4 fills it from a checkpoint)."""

    step: int = 0
    tokens: int = 0
    resume_from: Optional[Path] = None
    eval_loss: Optional[float] = None
    skipped_steps: int = 0
    preempted_by: Optional[str] = None


@contextlib.contextmanager
def _without_env(name: str, hide: bool):
    """Hides an environment variable while the block runs, then restores it. Accelerate reads
    its parallelism only from the environment; there is no argument to override it."""
    hidden = os.environ.pop(name, None) if hide else None
    try:
        yield
    finally:
        if hidden is not None:
            os.environ[name] = hidden


def setup_runtime(cfg: Config) -> Runtime:
    """Phase 1: strategy, precision, batch arithmetic, the Accelerator (and its process group,
    with ``--dist_timeout_s``), the output directory and the seed. Collective."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    t = cfg.train
    cuda = torch.cuda.is_available()
    bf16 = t.mixed_precision == "bf16" or (t.mixed_precision == "auto" and cuda and torch.cuda.is_bf16_supported())
    if bf16 and not cuda:
        raise ConfigError("--mixed_precision bf16 needs a GPU (this CPU has no bf16 arithmetic); use --mixed_precision no")
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    strategy = detect_strategy(t.parallel, world_env)
    if strategy in ("fsdp1", "fsdp2", "ddp") and world_env < 2:
        # One process: nothing to shard or replicate, and the code path is the plain one.
        strategy = "none"
    # Accelerate's own mixed precision only for the models it wraps; FSDP gets a policy instead.
    accel_mp = "bf16" if bf16 and strategy in ("none", "ddp", "deepspeed") else "no"
    cfg, accum = resolve(cfg, world_env)
    # FSDP is applied by us (parallel.py): hide the accelerate config's FSDP flag so Accelerate
    # builds a plain DDP-style state (its FSDP plugin would refuse the CPU or wrap the model).
    with _without_env("ACCELERATE_USE_FSDP", strategy in ("fsdp1", "fsdp2", "none")):
        # DeepSpeed on the CPU (DS_ACCELERATOR=cpu): Accelerator(cpu=True) would build no
        # DeepSpeed state, and without a backend Accelerate counts one process per rank.
        ds_cpu = strategy == "deepspeed" and not cuda
        accelerator = Accelerator(cpu=not cuda and not ds_cpu, mixed_precision=accel_mp,
                                  gradient_accumulation_steps=accum if strategy == "deepspeed" else 1,
                                  kwargs_handlers=process_group_kwargs(t.dist_timeout_s, "gloo" if ds_cpu else None))
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    if world != world_env:
        raise RuntimeError(f"WORLD_SIZE={world_env} but Accelerate sees {world} processes")
    out = Path(t.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    set_seed(t.seed)
    import datasets

    datasets.disable_progress_bars()  # one bar per run is enough: ours
    return Runtime(cfg, accelerator, strategy, world, rank, device, accelerator.is_main_process, bf16, accel_mp, accum, out)


def build_model_and_optimizer(rt: Runtime) -> Built:
    """Phase 2: tokenizer, LlamaConfig, the (sharded) model, optimizer and LR schedule."""
    t, d, m = rt.cfg.train, rt.cfg.data, rt.cfg.model
    accelerator, strategy, device = rt.accelerator, rt.strategy, rt.device
    with accelerator.local_main_process_first():  # builds the offline corpus/tokenizer cache once per node
        tokenizer = load_tokenizer(d)
    model_cfg = load_llama_config(m, len(tokenizer))
    if d.seq_len > model_cfg.max_position_embeddings:
        raise ConfigError(f"--seq_len {d.seq_len} exceeds the model's max_position_embeddings {model_cfg.max_position_embeddings}")
    n_params = count_parameters(model_cfg)
    # before any weight exists: the blocks allocated from here on follow the fixed threshold
    set_mmap_threshold(mmap_threshold_for(t.malloc_mmap_threshold, n_params))
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
    routed = (matrix_names(model, t.param_convention, t.moe_router) if t.optimizer != "adamw"
              else matrix_names(model, "reference"))
    splits = matrix_splits(model, t.param_convention, t.moe_router) if t.optimizer != "adamw" else {}
    # only the start-up lines of --spectral_method auto read them
    shapes = matrix_shape_counts(model, routed, splits) if t.optimizer != "adamw" and t.spectral_method == "auto" else {}
    std = model_cfg.initializer_range
    if strategy == "deepspeed":
        # The same per-name init as every other backend (ZeRO-3 may have partitioned the
        # parameters at construction: gathered a module at a time); DeepSpeed places them.
        init_weights_(model, t.seed, std)
    elif strategy == "fsdp2":
        reshard = t.fsdp_reshard_after_forward
        if reshard is None:
            reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() in ("true", "1", "full_shard")
        model = apply_fsdp2(model, device, rt.bf16, reshard)
        materialize(model, device, t.seed, std)
    else:
        materialize(model, device, t.seed, std)
        if strategy == "fsdp1":
            model = apply_fsdp1(model, device, rt.bf16)
    optimizer = build_optimizer(model, t, routed, splits)
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
    # Not prepared: an AcceleratedScheduler would step once per process. Checkpointed by
    # checkpoint.py as JSON (Accelerate would pickle it and unpickle it with weights_only=False).
    from torch.distributed.tensor import DTensor

    # Recorded in summary.json: the tests check that FSDP2 really sharded every parameter.
    param_kinds = {"tensors": 0, "dtensors": 0}
    for p in model.parameters():
        param_kinds["tensors"] += 1
        param_kinds["dtensors"] += isinstance(p, DTensor)
    esd = None
    if t.esd_steps and strategy == "deepspeed":
        raise ConfigError("--esd_steps is not supported under DeepSpeed ZeRO; use FSDP2, FSDP1, DDP or one process, or --esd_steps 0")
    if t.esd_steps:  # ESD statistics, each matrix on its owner rank (docs/diagnostics.md)
        from htmuon_dist.diagnostics.monitor import EsdMonitor

        from .optim import clean_name

        esd = EsdMonitor(optimizer, model, routed, clean_name)
    return Built(tokenizer, model_cfg, model, optimizer, scheduler, n_params, param_kinds, esd, shapes)


def prepare_data(rt: Runtime, built: Built) -> DataPlan:
    """Phase 3: this rank's training stream and the fixed validation batches. Collective."""
    t, d = rt.cfg.train, rt.cfg.data
    world, device = rt.world, rt.device
    vocab = built.model_cfg.vocab_size
    train_docs = load_documents(d, "train", rt.rank, world, t.seed)
    stream = TokenStream(train_docs, built.tokenizer, d, t.micro_batch_size, vocab, seed=t.seed)
    val_docs = load_documents(d, "validation", rt.rank, world, t.seed)
    per_rank = math.ceil(d.eval_tokens / world)
    evals = eval_batches(val_docs, built.tokenizer, d, t.micro_batch_size, vocab, per_rank)
    if not evals:
        source = f"--validation_files {d.validation_files}" if d.validation_files else (
            f"the held-out 5% (every 20th document) of --data_files {d.data_files}" if d.data_files else f"--dataset {d.dataset}")
        raise ConfigError(f"the validation data of rank {rt.rank} ({source}) fills no sequence of --seq_len {d.seq_len}; "
                          f"pass more (validation) data, use fewer processes or a smaller --seq_len")
    n_eval_batches = int(_all_reduce([len(evals)], device, dist.ReduceOp.MAX if world > 1 else None)[0])
    eval_available = int(_all_reduce([sum(int((b["labels"][:, 1:] != -100).sum()) for b in evals)], device)[0])
    if rt.is_main and eval_available < d.eval_tokens:
        print(f"note: evaluating on {eval_available:,} validation tokens: some rank's validation shard "
              f"holds fewer than its share of --eval_tokens {d.eval_tokens:,}", flush=True)
    return DataPlan(stream, evals, n_eval_batches)


def resume_state(rt: Runtime, built: Built, data: DataPlan) -> Progress:
    """Phase 4: restores model, optimizer, schedule, RNG and stream from the checkpoint chosen
    by ``--resume`` (auto: the newest one that passes verification). Collective."""
    t = rt.cfg.train
    expected = _trainer_state(rt.cfg, built.model_cfg, rt.strategy, rt.world, 0, 0)
    resume_from = ckpt.find_resume(rt.out, t.resume, t.checkpoint_verify)
    progress = Progress()
    if resume_from is not None:
        state = ckpt.check_compatible(resume_from, expected)
        data_state = ckpt.load(rt.accelerator, resume_from, built.model, built.optimizer, rt.strategy, built.scheduler)
        data.stream.load_state_dict(data_state)
        progress.step, progress.tokens = int(state["step"]), int(state["tokens"])
        progress.skipped_steps = int(state.get("skipped_steps", 0))
        progress.resume_from = resume_from
    return progress


def _announce(rt: Runtime, built: Built, progress: Progress, writer: MetricsWriter) -> None:
    """The main process's one-line run description, and config.json."""
    if not rt.is_main:
        return
    t, d, m = rt.cfg.train, rt.cfg.data, rt.cfg.model
    for msg in writer.messages:
        print(msg, flush=True)
    print(
        f"htmuon-train: {size_key(m.model)} LLaMA ({built.n_params / 1e6:.1f}M params), {t.optimizer} "
        f"lr {t.lr:g}, {rt.strategy} x {rt.world} ({rt.device.type}, {'bf16' if rt.bf16 else 'fp32'}), "
        f"batch {t.total_batch_size} = {t.micro_batch_size} x {rt.accum} accum x {rt.world}, seq {d.seq_len}, "
        f"{t.max_steps} steps" + (f", resumed at step {progress.step} from {progress.resume_from}" if progress.resume_from else ""),
        flush=True,
    )
    note = momentum_dtype_note(t, rt.device.type)
    if note:
        print(note, flush=True)
    for line in auto_choice_lines(t, rt.device, built.matrix_shapes or {}):
        print(line, flush=True)
    (rt.out / "config.json").write_text(json.dumps(rt.cfg.to_dict(), indent=2))


# spectral methods whose products round to 16 bits: on fp32 momentum they cut at fp16's noise rule
_SIXTEEN_BIT_METHODS = ("auto", "log_ns", "fast_ns")


def momentum_dtype_note(t: TrainArguments, device_type: str) -> Optional[str]:
    """A one-line note where a 16-bit spectral method runs on GPUs on fp32 momentum (fp32
    parameters, no ``--comm_dtype bf16``): it then plans for fp16's lower noise cutoff, longer than
    what it is priced at for bf16 momentum. None otherwise (pure function of the resolved config)."""
    if (device_type != "cuda" or t.optimizer == "adamw" or t.spectral_method not in _SIXTEEN_BIT_METHODS
            or t.param_dtype == "bf16" or t.comm_dtype == "bf16"):
        return None
    return (f"note: --spectral_method {t.spectral_method} sees fp32 momentum here, so its fp16 products cut at "
            "fp16's noise rule and plan longer lifts (log_ns: priced 1.33-1.49x NS5 at the LLaMA MLP shapes, "
            "against 1.06-1.09x on bf16 momentum); --comm_dtype bf16 exchanges bf16 momentum "
            "(docs/spectral.md, \"Momentum dtype\")")


def auto_choice_lines(t: TrainArguments, device: torch.device, shapes: dict[tuple[int, int], int]) -> list[str]:
    """Where ``--spectral_method auto`` runs: what it resolves to for HTMuon's matrix shapes on
    this device at ``--power`` (largest first), then why: a measured run of the shipped table or
    the documented rule, once if every shape has the same reason. Empty for any other method.
    Host-only (shapes and the shipped table): no collective, no tensor."""
    if t.optimizer == "adamw" or t.spectral_method != "auto" or not shapes:
        return []
    from htmuon_dist.spectral import auto_explain

    by_method: dict[str, list[str]] = {}
    whys: dict[str, str] = {}
    for (rows, cols), count in sorted(shapes.items(), key=lambda kv: (-kv[0][0] * kv[0][1], kv[0])):
        method, why = auto_explain(device.type, rows, cols, device.index, t.power)
        by_method.setdefault(method, []).append(f"{count} x {rows}x{cols}")
        whys[f"{rows}x{cols}"] = why
    lines = [f"--spectral_method auto on {device.type} at power {t.power:g}: "
             + "; ".join(f"{method} for {', '.join(items)}" for method, items in by_method.items())]
    if len(set(whys.values())) == 1:
        lines.append(f"  why: {next(iter(whys.values()))} (docs/spectral.md, \"auto\")")
    else:
        lines.extend(f"  {shape}: {why}" for shape, why in whys.items())
    return lines


def save_checkpoint(rt: Runtime, built: Built, data: DataPlan, progress: Progress,
                    data_state: Optional[dict[str, Any]] = None) -> Path:
    """Collective: the checkpoint of ``progress.step``. ``data_state``: where the stream stands
    after that step (default: the stream's own state; the loop passes its look-ahead's)."""
    state = _trainer_state(rt.cfg, built.model_cfg, rt.strategy, rt.world, progress.step, progress.tokens)
    state["skipped_steps"] = progress.skipped_steps
    return ckpt.save(rt.accelerator, rt.out, progress.step, built.model, built.optimizer, rt.strategy,
                     data_state if data_state is not None else data.stream.state_dict(), state,
                     rt.cfg.train.save_total_limit, built.scheduler)


@dataclass
class StepResult:
    """One optimizer step as the loop sees it. Nothing here has been read to the host."""

    loss_sum: torch.Tensor  # this rank's summed token losses (fp64, 0-d)
    global_targets: int  # target tokens of the step over all ranks (counted ahead, StepBatches)
    grad_norm: Optional[torch.Tensor | float]  # DeepSpeed's engine reports a float


def train_step(rt: Runtime, built: Built, batches: StepBatches, step: int) -> StepResult:
    """Step number ``step`` (1-based): ``accum`` micro-batches, one optimizer and schedule step.
    Collective (the model's and the optimizer's collectives only: no host read of the trainer's
    own; the batches and their global count were drawn ahead)."""
    model, optimizer, strategy, accum, world, device = built.model, built.optimizer, rt.strategy, rt.accum, rt.world, rt.device
    packed = rt.cfg.data.packing
    micro, global_targets = batches.next_step()
    # The backends average gradients over ranks, so divide by the mean per-rank count.
    denom = global_targets / world
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for i, batch in enumerate(micro):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with set_gradient_sync(model, strategy, i == accum - 1, rt.accelerator):
            with rt.autocast():
                loss, _ = token_loss_sum(model, batch, packed)
            scaled = loss / denom * (accum if strategy == "deepspeed" else 1)  # DeepSpeed divides by accum itself
            scaled = faults.poison_loss(scaled, step)
            rt.accelerator.backward(scaled)
        loss_sum += loss.detach().double()
    grad_norm = clip_grad_norm(model, strategy, rt.cfg.train.grad_clip)
    optimizer.step()
    built.scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_sum, global_targets, grad_norm)


class _SkipCounter:
    """HTMuon's count of skipped steps (``--nonfinite skip``), read only when the loop logs or
    saves: the optimizer may keep it on the device, and reading it is a host synchronisation."""

    def __init__(self, optimizer: Any, progress: Progress) -> None:
        self.inner = _htmuon_of(optimizer) or optimizer
        self.progress = progress
        self.seen = self._read()

    def _read(self) -> int:
        return int(getattr(self.inner, "skipped_steps", 0))

    def update(self) -> int:
        """Adds the steps skipped since the last call to ``progress.skipped_steps``; returns them."""
        now = self._read()
        new, self.seen = now - self.seen, now
        self.progress.skipped_steps += new
        return new


def train(rt: Runtime, built: Built, data: DataPlan, progress: Progress, writer: MetricsWriter,
          preempt: PreemptionWatch) -> float:
    """Phase 5: the steps up to ``--max_steps`` (or ``--stop_at_step``, or a pre-emption
    signal), with logging, evaluation and checkpoints. Returns the seconds spent."""
    from tqdm.auto import tqdm

    t = rt.cfg.train
    packed, device = rt.cfg.data.packing, rt.device
    window_tokens, window_start = 0, time.perf_counter()
    run_start = time.perf_counter()
    bar = tqdm(total=t.max_steps, initial=progress.step, disable=not (rt.is_main and t.progress_bar), unit="step", dynamic_ncols=True)
    stop = t.stop_at_step or t.max_steps
    # Host synchronisation of the loop's own happens only on logging, evaluation, checkpoint and
    # check steps (every --preempt_check_steps and the last): there the ranks agree on a
    # pre-emption signal and draw the next window of batches. One process reads its own signal
    # flag after every step (no collective, no tensor read).
    every = t.preempt_check_steps
    batches = StepBatches(data.stream, rt.accum, rt.world, packed, lambda v: _all_reduce(v, device))

    def window(after: int) -> int:  # steps from ``after`` to the next check step (or the stop)
        return min(every - after % every, stop - after)

    if progress.step < stop:
        batches.refill(window(progress.step))
    skips = _SkipCounter(built.optimizer, progress)
    built.model.train()
    while progress.step < stop:
        res = train_step(rt, built, batches, progress.step + 1)
        progress.step += 1
        progress.tokens += res.global_targets
        window_tokens += res.global_targets
        step = progress.step
        bar.update(1)
        faults.maybe_signal(step)

        if step % t.logging_steps == 0 or step == stop:
            new_skips = skips.update()
            if new_skips:  # with --logging_steps 1 exactly the skipped steps
                writer.log({"step": step, "skipped_step": True, "skipped_since_last_log": new_skips,
                            "skipped_steps": progress.skipped_steps})
                if rt.is_main:
                    bar.write(f"step {step}: {new_skips} step(s) skipped since the last log (non-finite gradients; "
                              f"{progress.skipped_steps} skipped so far)")
            step_loss = float(_all_reduce([float(res.loss_sum)], device)[0]) / res.global_targets
            elapsed = time.perf_counter() - window_start
            tps = window_tokens / max(elapsed, 1e-9)
            window_tokens, window_start = 0, time.perf_counter()
            row = {"step": step, "loss": step_loss, "lr": built.scheduler.get_last_lr()[0], "tokens": progress.tokens, "tokens_per_s": tps}
            if res.grad_norm is not None:
                row["grad_norm"] = float(res.grad_norm)
            htmuon = _htmuon_of(built.optimizer)
            stream_error = htmuon.stream_error() if htmuon is not None else None
            if stream_error is not None:  # htmuon_stream: how far its warm basis is from converged
                row["stream_error"] = stream_error
            if not math.isfinite(step_loss) and not new_skips:
                raise FloatingPointError(f"loss is {step_loss} at step {step}; lower --lr or raise --warmup_steps")
            writer.log(row)
            bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tps:,.0f}", lr=f"{row['lr']:.2e}", refresh=False)
        if built.esd is not None and (step % t.esd_steps == 0 or step == stop):
            writer.log(built.esd(step))
        if (t.eval_steps and step % t.eval_steps == 0) or step == t.max_steps:
            eval_loss, n_tok = evaluate(built.model, data.evals, data.n_eval_batches, packed, device, rt.autocast)
            progress.eval_loss = eval_loss
            writer.log({"step": step, "eval_loss": eval_loss, "eval_ppl": math.exp(eval_loss), "eval_tokens": n_tok})
            if rt.is_main:
                bar.write(f"step {step}: eval loss {eval_loss:.4f}, perplexity {math.exp(eval_loss):.2f} ({n_tok:,} tokens)")
        saved = (t.save_steps and step % t.save_steps == 0) or step == t.stop_at_step
        if saved:
            skips.update()
            save_checkpoint(rt, built, data, progress, batches.state_dict())
        if t.malloc_trim_steps and (saved or step % t.malloc_trim_steps == 0):
            malloc_trim()  # RSS otherwise creeps up with freed-but-kept heap (memory.py)
        check = step % every == 0 or step == stop
        if not check and rt.world > 1:
            continue
        # Every rank must stop after the same step: agree on whether any rank saw a signal.
        signal_name = preempt.agreed(device)
        if check and signal_name is None and step < stop:
            batches.refill(window(step))
        if signal_name is not None and step < t.max_steps:
            if not saved:
                skips.update()
                save_checkpoint(rt, built, data, progress, batches.state_dict())
            progress.preempted_by = signal_name
            if rt.is_main:
                write_marker(rt.out, step, signal_name)
            # Nobody exits before the marker exists: under SLURM's --kill-on-bad-exit the first
            # rank to exit gets the others killed, and the requeue looks for the marker.
            rt.accelerator.wait_for_everyone()
            preempt.disarm()
            if rt.is_main:
                bar.write(f"step {step}: {signal_name} received; checkpoint saved, exiting with status {PREEMPTED_EXIT}")
            break
    bar.close()
    skips.update()
    data.stream.load_state_dict(batches.state_dict())  # finish()'s final checkpoint: the steps trained
    return time.perf_counter() - run_start


def finish(rt: Runtime, built: Built, data: DataPlan, progress: Progress, writer: MetricsWriter,
           train_s: float, start: tuple[int, int]) -> dict[str, Any]:
    """Phase 6: summary.json and, after the last step, the final checkpoint, export and plot."""
    t, m, d = rt.cfg.train, rt.cfg.model, rt.cfg.data
    step, tokens = progress.step, progress.tokens
    steps_run = step - start[0]
    summary: dict[str, Any] = {
        "step": step, "stopped_early": step < t.max_steps, "train_seconds": round(train_s, 2),
        "steps_run": steps_run, "tokens": tokens,
        "tokens_per_s": (tokens - start[1]) / max(train_s, 1e-9) if steps_run else None,
        "params": built.n_params, "optimizer": t.optimizer, "strategy": rt.strategy, "world_size": rt.world,
        "param_tensors": built.param_kinds["tensors"], "dtensor_params": built.param_kinds["dtensors"],
        "optimizer_class": type(_client_optimizer(built.optimizer)).__name__,
        "param_dtypes": sorted({str(p.dtype).replace("torch.", "") for p in built.model.parameters()}),
        "skipped_steps": progress.skipped_steps, "preempted_by": progress.preempted_by,
    }
    if progress.eval_loss is not None:
        summary.update(eval_loss=progress.eval_loss, eval_ppl=math.exp(progress.eval_loss))
    if step < t.max_steps:
        if rt.is_main:
            (rt.out / "summary.json").write_text(json.dumps(summary, indent=2))
        writer.close()
        return summary

    if t.save_steps and step % t.save_steps:
        save_checkpoint(rt, built, data, progress)  # the final state is always resumable
    if t.export_model:
        export_dir = rt.out / "final_model"
        full = _full_state_dict(rt.accelerator, built.model, rt.strategy)
        probe = data.evals[0]["input_ids"][:1, : min(32, d.seq_len)].to(rt.device)
        built.model.eval()
        with torch.no_grad(), rt.autocast():
            probe_logits = built.model(input_ids=probe, use_cache=False).logits.float().cpu()
        if rt.is_main:
            export_pretrained(full, built.model_cfg, built.tokenizer, export_dir)
            torch.save({"input_ids": probe.cpu(), "logits": probe_logits}, export_dir / "probe_logits.pt")
            summary["export_dir"] = str(export_dir)
        rt.accelerator.wait_for_everyone()
    if rt.is_main:
        if t.plot:
            msg = plot_losses(rt.out / "metrics.jsonl", rt.out / "loss.png",
                              f"{size_key(m.model)} LLaMA, {t.optimizer}, {rt.strategy} x {rt.world}")
            print(msg or f"loss plot: {rt.out / 'loss.png'}", flush=True)
        if t.plot and t.esd_steps:
            from htmuon_dist.diagnostics.plots import plot_alpha_over_steps

            msg = plot_alpha_over_steps(rt.out / "metrics.jsonl", rt.out / "esd_alpha.png",
                                        f"{size_key(m.model)} LLaMA, {t.optimizer}: ESD alpha per matrix type")
            print(msg or f"alpha plot: {rt.out / 'esd_alpha.png'}", flush=True)
        (rt.out / "summary.json").write_text(json.dumps(summary, indent=2))
        if progress.eval_loss is not None:
            print(f"final eval loss {progress.eval_loss:.4f}, perplexity {math.exp(progress.eval_loss):.2f}; "
                  f"{summary['tokens_per_s']:,.0f} tokens/s; {train_s:.1f} s for {steps_run} steps", flush=True)
    writer.close()
    return summary


def run(cfg: Config, preempt: Optional[PreemptionWatch] = None) -> dict[str, Any]:
    """Trains, evaluates, checkpoints and exports; returns the summary (on every rank).

    ``summary["preempted_by"]`` names the signal when a pre-emption stopped the run (after
    checkpointing); the CLI then exits with :data:`PREEMPTED_EXIT`.
    """
    preempt = preempt or PreemptionWatch.install(cfg.train.preempt_signals)
    rt = setup_runtime(cfg)
    built = build_model_and_optimizer(rt)
    data = prepare_data(rt, built)
    progress = resume_state(rt, built, data)
    t = rt.cfg.train
    writer = MetricsWriter(rt.out, t.report_to, rt.is_main, t.run_name, rt.cfg.to_dict(), resumed_step=progress.step)
    _announce(rt, built, progress, writer)
    start = (progress.step, progress.tokens)
    train_s = train(rt, built, data, progress, writer, preempt)
    return finish(rt, built, data, progress, writer, train_s, start)


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
