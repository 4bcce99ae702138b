"""Command-line and YAML arguments of the LLaMA pretraining entry point.

Three Hugging Face style dataclasses, parsed by :class:`transformers.HfArgumentParser`:
``--config x.yaml`` supplies defaults (a flat mapping, or sections ``model:``, ``data:``,
``train:``), and any ``--name value`` on the command line overrides them. Unset
hyperparameters (``None``) are filled from the reference table for the model size
(REFERENCE.md) by :func:`resolve`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from .common import REPO_ROOT, ConfigError, model_config_path

OPTIMIZERS = (
    "htmuon", "htmuon_interval", "htmuon_stream", "htmuon_ns", "htmuon_ht", "muon", "normuon",
    "htnormuon", "htnormuon_interval", "adamw",
)
ADJUST_LR_FNS = ("original", "match_rms_adamw")
PARAM_DTYPES = ("fp32", "bf16")
STRATEGIES = ("auto", "fsdp2", "fsdp1", "ddp", "deepspeed", "none")


# optimizers whose spectral method is part of their name
FIXED_METHODS = {"htmuon_stream": "stream", "htmuon_ns": "ns_roots", "htmuon_ht": "ht"}


@dataclass
class ModelArguments:
    """Which LLaMA to build."""

    model: str = field(
        default="tiny",
        metadata={"help": "name of a JSON in configs/model/ (tiny, 60m, 135m, 350m, 1b, 3b, 7b) or a path to a LlamaConfig JSON"},
    )
    model_overrides: Optional[str] = field(
        default=None, metadata={"help": 'JSON object merged into the model config, e.g. \'{"num_hidden_layers": 2}\''}
    )
    activation_checkpointing: bool = field(
        default=False, metadata={"help": "recompute each decoder layer in backward (less memory, about 30 percent more compute)"}
    )


@dataclass
class DataArguments:
    """Where the text comes from and how it becomes token sequences."""

    dataset: str = field(
        default="offline",
        metadata={"help": "offline (stdlib docstrings, no download), c4 (allenai/c4 en, streaming), json, text or parquet (with --data_files)"},
    )
    data_files: Optional[str] = field(default=None, metadata={"help": "comma-separated files or globs for json/text/parquet"})
    validation_files: Optional[str] = field(
        default=None, metadata={"help": "validation files; default: every 20th document of data_files is held out"}
    )
    text_field: str = field(default="text", metadata={"help": "column holding the text"})
    tokenizer: str = field(
        default="offline",
        metadata={"help": "offline (byte-level BPE trained on the offline corpus, cached), bytes (plain bytes), or any HF tokenizer name/path (t5-base for the reference)"},
    )
    tokenizer_vocab_size: int = field(default=4096, metadata={"help": "vocabulary of the offline BPE tokenizer"})
    seq_len: int = field(default=256, metadata={"help": "tokens per training sequence"})
    packing: bool = field(
        default=True,
        metadata={"help": "concatenate documents (EOS-separated) into full sequences; --packing false is the reference mode: one document per sequence, truncated/padded, pad masked in the loss"},
    )
    shuffle_buffer: int = field(default=10_000, metadata={"help": "streaming shuffle buffer (documents)"})
    eval_tokens: int = field(default=10_000_000, metadata={"help": "validation tokens per evaluation (all ranks together)"})
    cache_dir: Optional[str] = field(
        default=None, metadata={"help": "cache for the offline corpus and tokenizer (default $HTMUON_CACHE or ~/.cache/htmuon_dist)"}
    )


@dataclass
class TrainArguments:
    """Optimisation, schedule, parallelism, logging and checkpoints."""

    output_dir: str = field(default="outputs/run", metadata={"help": "metrics, checkpoints, plot and the exported model"})
    optimizer: str = field(
        default="htmuon",
        metadata={"help": "htmuon (exact U S^p V^T) | htmuon_interval (exact every k-th step, NS5 between) | htmuon_stream (one warm-started QR power step per step; its basis is optimizer state) | htmuon_ns (the reference's NS polar x NS roots; p = 2^-k) | htmuon_ht (prescribed spectrum U diag(i^-p) V^T) | muon | normuon (Muon + NorMuon row normalisation) | htnormuon (HTMuon + NorMuon) | htnormuon_interval | adamw"},
    )
    lr: Optional[float] = field(default=None, metadata={"help": "lr of the matrix optimizer (adamw: of everything); default from the reference table"})
    adamw_lr: Optional[float] = field(default=None, metadata={"help": "lr of the AdamW part of htmuon/muon (norm gains...); default: the size's AdamW lr"})
    power: Optional[float] = field(default=None, metadata={"help": "HTMuon p (default 0.125; muon forces 0)"})
    spectral_method: Optional[str] = field(default=None, metadata={"help": "eigh (exact, default for htmuon) | svd | tracked_ns | fast_ns (fp16/bf16 products, for GPUs, priced 1.9-2.6x NS5) | log_ns (fp16/bf16 products with a soft rank cut, priced 1.06-1.09x NS5 on tall matrices and 1.87-1.93x near square for bf16 momentum, see --comm_dtype; what auto runs on CUDA where it met the bar: m/n >= 2, and near square for power >= 1/8) | gram_rr | gram32 | auto | ns5 (muon) | polar_express (muon: Polar Express, NS5 cost) | ns_roots | ht | stream; with htnormuon, NorMuon on any of them; see htmuon_dist.available_methods()"})
    interval: Optional[int] = field(default=None, metadata={"help": "htmuon_interval: exact step every k-th step (default 5)"})
    comm_dtype: str = field(
        default="none",
        metadata={"help": "HTMuon's exchange (wire) dtype and that of the owners' whole matrices: none (the momentum's own, "
                          "fp32 under --param_dtype fp32) | bf16 (half the traffic and owner memory; the spectral methods "
                          "see bf16 momentum and its noise cutoff: the regime log_ns/auto on GPUs is priced and measured in, "
                          "docs/spectral.md) | fp32"},
    )
    param_convention: str = field(
        default="reference", metadata={"help": "reference (every >=2-D weight incl. embedding/head to HTMuon) | muon (embedding/head to AdamW)"}
    )
    moe_router: str = field(
        default="adamw", metadata={"help": "MoE models: the router (E x hidden) to adamw (default; htmuon measured no better on moe_tiny, docs/distributed.md) or htmuon"}
    )
    weight_decay: float = field(default=0.1, metadata={"help": "decoupled weight decay of the matrices (AdamW: of >=2-D weights)"})
    momentum: float = field(default=0.95, metadata={"help": "HTMuon/Muon momentum"})
    normuon_beta2: float = field(default=0.95, metadata={"help": "normuon/htnormuon: EMA factor of the per-row second moment"})
    adjust_lr_fn: Optional[str] = field(
        default=None,
        metadata={"help": "lr scale of the matrix updates, torch.optim.Muon's meaning: unset = this library's max(1, m/n)^0.5 | original (the same) | match_rms_adamw (0.2 sqrt(max(m, n)): an AdamW lr carries over; the default lr becomes the size's AdamW lr)"},
    )
    adamw_weight_decay: float = field(default=0.0, metadata={"help": "decoupled weight decay of the AdamW part of htmuon/muon (norm gains...); the reference: 0.1"})
    param_dtype: str = field(default="fp32", metadata={"help": "fp32 (fp32 master weights; bf16 compute via --mixed_precision) | bf16 (pure bf16 parameters, optimizer states and gradients, as the reference)"})
    max_steps: Optional[int] = field(default=None, metadata={"help": "optimizer steps (exactly); default from the reference table"})
    warmup_steps: Optional[int] = field(default=None, metadata={"help": "linear warmup steps; default max_steps/10"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine decays to this fraction of the peak lr"})
    total_batch_size: int = field(default=512, metadata={"help": "sequences per optimizer step over all ranks"})
    micro_batch_size: int = field(default=64, metadata={"help": "sequences per forward pass per rank"})
    grad_clip: float = field(default=1.0, metadata={"help": "max global gradient norm (0 disables)"})
    seed: int = field(default=42, metadata={"help": "model init and data order"})
    mixed_precision: str = field(default="auto", metadata={"help": "auto (bf16 on a GPU that has it, else fp32) | bf16 | no"})
    allow_cpu: bool = field(default=False, metadata={"help": "run on the CPU even when the accelerate config asks for GPUs (otherwise that stops at once)"})
    parallel: str = field(
        default="auto", metadata={"help": "auto (from the accelerate config) | fsdp2 | fsdp1 | ddp | deepspeed | none"}
    )
    fsdp_reshard_after_forward: Optional[bool] = field(default=None, metadata={"help": "default: FSDP_RESHARD_AFTER_FORWARD from the accelerate config, else true"})
    eval_steps: int = field(default=1000, metadata={"help": "evaluate every N steps (and always at the end); 0 = only at the end"})
    logging_steps: int = field(default=10, metadata={"help": "write metrics every N steps"})
    save_steps: int = field(default=1000, metadata={"help": "checkpoint every N steps (0 = never)"})
    save_total_limit: int = field(default=2, metadata={"help": "checkpoints kept"})
    resume: str = field(default="auto", metadata={"help": "auto (latest checkpoint in output_dir) | never | a checkpoint directory"})
    stop_at_step: Optional[int] = field(default=None, metadata={"help": "save and exit after this step (simulates a pre-emption; the schedule still spans max_steps)"})
    report_to: str = field(default="jsonl,tensorboard", metadata={"help": "comma list of jsonl, tensorboard, wandb (each only if installed), or none"})
    run_name: Optional[str] = field(default=None, metadata={"help": "name for wandb/TensorBoard"})
    progress_bar: bool = field(default=True, metadata={"help": "tqdm bar on the main process"})
    export_model: bool = field(default=True, metadata={"help": "save_pretrained (safetensors) into output_dir/final_model at the end"})
    plot: bool = field(default=True, metadata={"help": "PNG of train/eval loss at the end (needs matplotlib)"})
    esd_steps: int = field(default=0, metadata={"help": "every N steps, ESD power-law alpha and spectral stats of every hidden matrix, each on its owner rank (0 = off; see docs/diagnostics.md)"})
    dist_timeout_s: int = field(
        default=1800,
        metadata={"help": "process-group timeout (s): a rank that dies or stops makes the others exit after this long. "
                          "Raise it when one rank works alone for long (7B DCP saves, corpus preparation, rank-0 export)"},
    )
    nonfinite: str = field(default="raise", metadata={"help": "HTMuon on a NaN/Inf gradient: raise (stop) | skip (skip the step, log it)"})
    nonfinite_patience: int = field(default=10, metadata={"help": "--nonfinite skip: stop after this many consecutive skipped steps"})
    checkpoint_verify: str = field(
        default="sha256", metadata={"help": "on resume, check the checkpoint's manifest: sha256 (sizes and checksums) | size | none"}
    )
    malloc_trim_steps: int = field(
        default=200, metadata={"help": "return freed heap memory to the OS (glibc malloc_trim) every N steps and after each checkpoint; 0 = never"}
    )
    malloc_mmap_threshold: int = field(
        default=-1, metadata={"help": "glibc's mmap threshold in bytes, fixed at start-up: freed blocks of this size or more go back to the OS at once; -1 = auto (1 MiB for models of >= 100M parameters: -0.8 GiB peak RSS at 350M on CPU), 0 = glibc's dynamic default"}
    )
    preempt_signals: str = field(
        default="SIGTERM,SIGUSR1",
        metadata={"help": "signals that make every rank finish the current step, checkpoint and exit with status 75 "
                          "(docs/reliability.md); none disables"},
    )
    preempt_check_steps: int = field(
        default=10,
        metadata={"help": "distributed runs: the ranks agree on a pre-emption signal every N steps (one all-reduce; "
                          "a signal stops the run within N steps) and, with --packing false, exchange the next N "
                          "steps' target-token counts then; no host synchronisation of the trainer's own in between"},
    )


ARG_CLASSES = (ModelArguments, DataArguments, TrainArguments)
SECTIONS = {"model": ModelArguments, "data": DataArguments, "train": TrainArguments}


@dataclass
class Config:
    """The three argument groups plus values derived from them and the world size."""

    model: ModelArguments
    data: DataArguments
    train: TrainArguments

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {k: dataclasses.asdict(getattr(self, k)) for k in ("model", "data", "train")}


# --- the reference table (REFERENCE.md) -------------------------------------------------------
# size -> steps, warmup, AdamW lr, Muon lr, HTMuon lr, default HTMuon optimizer. "tiny" is this
# project's CPU demo (tuned for a few hundred steps, not from the paper).
REFERENCE_TABLE: dict[str, dict[str, Any]] = {
    "tiny": dict(max_steps=300, warmup_steps=30, adamw=3e-3, muon=0.02, htmuon=0.05),
    # the Mixtral-style CPU MoE (4 experts): tiny's values, not tuned for it
    "moe_tiny": dict(max_steps=300, warmup_steps=30, adamw=3e-3, muon=0.02, htmuon=0.05),
    "60m": dict(max_steps=10_000, warmup_steps=1_000, adamw=1e-3, muon=0.01, htmuon=0.03),
    "135m": dict(max_steps=20_000, warmup_steps=2_000, adamw=1e-3, muon=0.01, htmuon=0.03),
    "350m": dict(max_steps=60_000, warmup_steps=6_000, adamw=1e-3, muon=5e-3, htmuon=5e-3),
    "1b": dict(max_steps=90_000, warmup_steps=9_000, adamw=6e-4, muon=5e-3, htmuon=5e-3),
}
# Sizes the paper did not train: the 1B row is the closest guess, and the user is told.
_EXTRAPOLATED = {"3b": "1b", "7b": "1b"}


def _flatten_yaml(data: Any, path: str) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value, got {type(data).__name__}")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, dict):
            allowed = {f.name for f in dataclasses.fields(SECTIONS[key])}
            for sub_key, sub_value in value.items():
                if sub_key not in allowed:
                    _unknown(sub_key, allowed, f"{path} section {key!r}")
                flat[sub_key] = sub_value
        else:
            flat[key] = value
    return flat


def _unknown(key: str, allowed: Sequence[str], where: str) -> None:
    close = difflib.get_close_matches(key, list(allowed), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ConfigError(f"{where}: unknown option {key!r}{hint}; see `htmuon-train --help`")


def _argparse_error(message: str):
    raise ConfigError(f"{message}; see `htmuon-train --help`")


def parse_args(argv: Optional[Sequence[str]] = None) -> Config:
    """``--config file.yaml`` then command-line overrides -> a resolved-later :class:`Config`."""
    from transformers import HfArgumentParser

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    parser = HfArgumentParser(ARG_CLASSES)
    parser.add_argument("--config", default=None, help="YAML file of defaults; command-line options override it")
    if known.config:
        path = Path(known.config)
        if not path.is_file():
            raise ConfigError(f"--config {known.config}: no such file")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
            raise ConfigError(f"--config {path}: not valid YAML{at} ({getattr(e, 'problem', None) or type(e).__name__}); fix the file") from None
        except (UnicodeDecodeError, OSError) as e:
            raise ConfigError(f"--config {path}: cannot read it as UTF-8 text ({type(e).__name__}); pass a YAML file") from None
        flat = _flatten_yaml(loaded, str(path))
        allowed = {f.name for cls in ARG_CLASSES for f in dataclasses.fields(cls)}
        for key in flat:
            if key not in allowed:
                _unknown(key, allowed, str(path))
        parser.set_defaults(**flat)
    # argparse prints usage and exits on a bad value; the CLI wants one line and status 2 instead.
    parser.error = _argparse_error  # type: ignore[method-assign]
    # The extra Namespace holding --config comes back last; the dataclasses come first.
    try:
        outputs = parser.parse_args_into_dataclasses(args=list(rest), look_for_args_file=False)
    except ConfigError:
        raise
    except ValueError as e:  # HfArgumentParser's "arguments are not used" (unknown options)
        unknown = [a for a in rest if a.startswith("--") and a[2:].split("=")[0] not in
                   {f.name for cls in ARG_CLASSES for f in dataclasses.fields(cls)} | {"config"}]
        if not unknown:
            raise ConfigError(f"{e}; see `htmuon-train --help`") from None
        _unknown(unknown[0][2:].split("=")[0], [f.name for cls in ARG_CLASSES for f in dataclasses.fields(cls)], "the command line")
    model_args, data_args, train_args = outputs[:3]
    return Config(model=model_args, data=data_args, train=train_args)


def size_key(model: str) -> str:
    """``configs/model/60m.json`` or ``60m`` -> ``60m`` (the reference table's key)."""
    return Path(model).stem.lower()


def resolve(cfg: Config, world_size: int) -> tuple[Config, int]:
    """Fills defaults from the reference table and checks the batch arithmetic.

    Returns:
        the config with no ``None`` hyperparameters left, and the gradient accumulation steps.

    Raises:
        ConfigError: naming the option to change.
    """
    t, d = cfg.train, cfg.data
    if t.optimizer not in OPTIMIZERS:
        _unknown(t.optimizer, OPTIMIZERS, "--optimizer")
    if t.parallel not in STRATEGIES:
        _unknown(t.parallel, STRATEGIES, "--parallel")
    if t.moe_router not in ("adamw", "htmuon"):
        raise ConfigError(f"--moe_router must be 'adamw' or 'htmuon', got {t.moe_router!r}")
    if t.param_convention not in ("reference", "muon"):
        raise ConfigError(f"--param_convention must be 'reference' or 'muon', got {t.param_convention!r}")
    if t.mixed_precision not in ("auto", "bf16", "no"):
        raise ConfigError(f"--mixed_precision must be auto, bf16 or no, got {t.mixed_precision!r}")
    model_config_path(cfg.model.model)  # a missing model file is the first thing to fix
    key = size_key(cfg.model.model)
    row = REFERENCE_TABLE.get(key)
    if row is None and key in _EXTRAPOLATED:
        row = REFERENCE_TABLE[_EXTRAPOLATED[key]]
        if t.lr is None or t.max_steps is None:
            warnings.warn(f"model {key}: the reference has no hyperparameters for this size; using the {_EXTRAPOLATED[key]} row")
    if row is None:
        missing = [n for n in ("lr", "max_steps") if getattr(t, n) is None]
        if missing:
            raise ConfigError(
                f"model {cfg.model.model!r} is not in the reference table ({', '.join(REFERENCE_TABLE)}); "
                f"pass {' and '.join('--' + m for m in missing)} explicitly"
            )
        row = REFERENCE_TABLE["60m"]
    if t.max_steps is None:
        t.max_steps = int(row["max_steps"])
    if t.warmup_steps is None:
        t.warmup_steps = int(row["warmup_steps"]) if t.max_steps == row["max_steps"] else max(1, t.max_steps // 10)
    if t.adjust_lr_fn is not None and t.adjust_lr_fn not in ADJUST_LR_FNS:
        _unknown(t.adjust_lr_fn, ADJUST_LR_FNS, "--adjust_lr_fn")
    if t.param_dtype not in PARAM_DTYPES:
        _unknown(t.param_dtype, PARAM_DTYPES, "--param_dtype")
    if t.lr is None:
        if t.adjust_lr_fn == "match_rms_adamw":
            t.lr = float(row["adamw"])
        else:
            t.lr = float({"adamw": row["adamw"], "muon": row["muon"], "normuon": row["muon"]}.get(t.optimizer, row["htmuon"]))
    if t.adamw_lr is None:
        t.adamw_lr = float(row["adamw"])
    if t.optimizer in ("muon", "normuon"):
        if t.power not in (None, 0, 0.0):
            raise ConfigError(f"--optimizer {t.optimizer} is HTMuon with power 0; got --power {t.power} (use --optimizer {'ht' + t.optimizer})")
        t.power, t.spectral_method = 0.0, t.spectral_method or "ns5"
    elif t.optimizer in FIXED_METHODS:
        fixed = FIXED_METHODS[t.optimizer]
        if t.spectral_method not in (None, fixed):
            raise ConfigError(f"--optimizer {t.optimizer} uses spectral method {fixed!r}; got --spectral_method {t.spectral_method} (drop it or use --optimizer htmuon)")
        t.power = 0.125 if t.power is None else float(t.power)
        t.spectral_method = fixed
    elif t.optimizer in ("htmuon", "htmuon_interval", "htnormuon", "htnormuon_interval"):
        t.power = 0.125 if t.power is None else float(t.power)
        t.spectral_method = t.spectral_method or "eigh"
        if t.optimizer.endswith("_interval"):
            t.interval = 5 if t.interval is None else t.interval  # 0 is an error (validate.py), not "default"
    if t.optimizer != "adamw":
        from htmuon_dist.spectral import check_power, validate_power

        try:
            validate_power(t.power, "--power")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        try:
            check_power(t.spectral_method, t.power)
        except ValueError as e:
            raise ConfigError(f"--spectral_method {t.spectral_method} (--power {t.power}): {e}") from None
    if t.max_steps < 1:
        raise ConfigError(f"--max_steps must be >= 1, got {t.max_steps}")
    if not 0 <= t.warmup_steps <= t.max_steps:
        raise ConfigError(f"--warmup_steps must be in [0, max_steps={t.max_steps}], got {t.warmup_steps}")
    if t.stop_at_step is not None and not 1 <= t.stop_at_step <= t.max_steps:
        raise ConfigError(f"--stop_at_step must be in [1, max_steps={t.max_steps}], got {t.stop_at_step}")
    if t.micro_batch_size < 1 or t.total_batch_size < 1:
        raise ConfigError("--micro_batch_size and --total_batch_size must be >= 1")
    per_step = t.micro_batch_size * world_size
    if t.total_batch_size % per_step:
        ok = sorted({m for m in range(1, t.total_batch_size + 1) if t.total_batch_size % (m * world_size) == 0})
        raise ConfigError(
            f"--total_batch_size {t.total_batch_size} is not a multiple of micro_batch_size "
            f"{t.micro_batch_size} x {world_size} processes = {per_step}; change --micro_batch_size "
            f"(divisors that fit: {ok[-6:]}) or --total_batch_size (e.g. {math.ceil(t.total_batch_size / per_step) * per_step})"
        )
    if t.esd_steps < 0:
        raise ConfigError(f"--esd_steps must be >= 0 (0 = off), got {t.esd_steps}")
    if d.seq_len < 2:
        raise ConfigError(f"--seq_len must be >= 2, got {d.seq_len}")
    if d.dataset in ("json", "text", "parquet") and not d.data_files:
        raise ConfigError(f"--dataset {d.dataset} needs --data_files (comma-separated paths or globs)")
    if d.dataset not in ("offline", "c4", "json", "text", "parquet"):
        _unknown(d.dataset, ("offline", "c4", "json", "text", "parquet"), "--dataset")
    return cfg, t.total_batch_size // per_step


def cache_dir(data: DataArguments) -> Path:
    """Where the offline corpus and tokenizer are cached (shared by runs on this machine)."""
    root = data.cache_dir or os.environ.get("HTMUON_CACHE") or Path.home() / ".cache" / "htmuon_dist"
    return Path(root)
