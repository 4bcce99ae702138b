"""Validation at the boundary: every option, the model JSON and the data files are checked
before any process group, model or dataset exists, so a bad input costs a second and ends as
one ``htmuon-train: configuration error: ...`` line (exit status 2) naming the option or file
and the fix. Runs on every rank (cheap: it reads at most 1 MiB of each data file); the CLI
prints the message on rank 0 only.

What needs the tokenizer or the whole data set (a shard too short for one sequence after
tokenisation, ids beyond the vocabulary) is checked where the data is read (data.py), with the
same kind of message.
"""

from __future__ import annotations

import copy
import gzip
import json
import math
import os
import typing
from pathlib import Path
from typing import Any

from .common import ConfigError

_SAMPLE = 1 << 20  # bytes of each data file read here


def preflight(cfg) -> None:
    """Raises :class:`ConfigError` for the first problem found in ``cfg`` (a parsed, unresolved
    :class:`~.config.Config`); returns None when everything checked here is fine."""
    from .config import resolve

    from .model import load_llama_config

    check_types(cfg)
    model_cfg = load_llama_config(cfg.model)  # the model JSON and --model_overrides come first
    world = int(os.environ.get("WORLD_SIZE", "1"))
    resolved, _ = resolve(copy.deepcopy(cfg), world)  # choices, batch arithmetic
    check_ranges(resolved)
    if resolved.data.seq_len > model_cfg.max_position_embeddings:
        raise ConfigError(f"--seq_len {resolved.data.seq_len} exceeds the model's max_position_embeddings "
                          f"{model_cfg.max_position_embeddings}; lower --seq_len or raise it with --model_overrides")
    check_data_files(resolved.data, world)


# --- types ----------------------------------------------------------------------------------

def _expected(annotation: Any) -> tuple[tuple[type, ...], bool]:
    """(accepted types, None allowed) for a resolved field type such as ``Optional[float]``."""
    args = typing.get_args(annotation)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), annotation) if args else annotation
    kinds = {str: (str,), int: (int,), float: (float, int), bool: (bool,)}.get(base, (object,))
    return kinds, optional


def check_types(cfg) -> None:
    """YAML values are not converted by argparse: a list, a mapping or a word where a number is
    expected must be reported here, not as a TypeError deep in the run."""
    for section in ("model", "data", "train"):
        obj = getattr(cfg, section)
        hints = typing.get_type_hints(type(obj))
        for name, annotation in hints.items():
            value = getattr(obj, name)
            kinds, optional = _expected(annotation)
            if value is None and optional:
                continue
            ok = isinstance(value, kinds) and not (kinds != (bool,) and isinstance(value, bool))
            if not ok:
                want = " or ".join(k.__name__ for k in kinds) + (" (or unset)" if optional else "")
                # YAML reads an unquoted no/yes/off/on as a boolean
                hint = '; quote it in the YAML (e.g. "no")' if isinstance(value, bool) and str in kinds else ""
                raise ConfigError(f"--{name} must be {want}, got {value!r} ({type(value).__name__}){hint}; "
                                  f"fix it on the command line or in the --config YAML")


# --- ranges -----------------------------------------------------------------------------------

def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def check_ranges(cfg) -> None:
    """Numeric ranges and choices of a resolved config (no ``None`` hyperparameters left)."""
    from .checkpoint import VERIFY_MODES
    from .optim import COMM_DTYPES
    from .preemption import parse_signals

    t, d = cfg.train, cfg.data
    _need(_finite(t.lr) and t.lr > 0, f"--lr must be a positive number, got {t.lr}; the reference values are in REFERENCE.md (tiny: 0.05 for htmuon)")
    _need(_finite(t.adamw_lr) and t.adamw_lr > 0, f"--adamw_lr must be a positive number, got {t.adamw_lr}")
    _need(_finite(t.momentum) and 0 <= t.momentum < 1, f"--momentum must be in [0, 1), got {t.momentum}; 0.95 is the reference")
    _need(_finite(t.weight_decay) and t.weight_decay >= 0, f"--weight_decay must be >= 0, got {t.weight_decay}")
    _need(_finite(t.min_lr_ratio) and 0 <= t.min_lr_ratio <= 1, f"--min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    _need(_finite(t.grad_clip) and t.grad_clip >= 0, f"--grad_clip must be >= 0 (0 disables clipping), got {t.grad_clip}")
    if t.optimizer != "adamw":
        import htmuon_dist

        _need(_finite(t.power) and 0 <= t.power <= 1, f"--power must be in [0, 1] (0 is Muon, 0.125 the paper's HTMuon), got {t.power}")
        methods = sorted(htmuon_dist.available_methods())
        _need(t.spectral_method in methods, f"--spectral_method {t.spectral_method!r} is not one of {methods}; eigh is the exact default")
        _need(not (t.spectral_method == "ns5" and t.power != 0),
              f"--spectral_method ns5 computes Muon (power 0) only, got --power {t.power}; use eigh, svd, tracked_ns, fast_ns or log_ns for HTMuon")
    _need(t.comm_dtype in COMM_DTYPES, f"--comm_dtype must be one of {', '.join(COMM_DTYPES)}, got {t.comm_dtype!r}")
    _need(t.comm_dtype == "none" or t.optimizer != "adamw",
          f"--comm_dtype {t.comm_dtype} sets HTMuon's exchange dtype; --optimizer adamw has no exchange (drop it)")
    if t.interval is not None:
        _need(t.interval >= 1, f"--interval must be >= 1 (an exact step every k-th step), got {t.interval}")
    _need(t.seed >= 0, f"--seed must be >= 0, got {t.seed}")
    _need(t.logging_steps >= 1, f"--logging_steps must be >= 1, got {t.logging_steps}")
    _need(t.preempt_check_steps >= 1, f"--preempt_check_steps must be >= 1 (1 = after every step), got {t.preempt_check_steps}")
    _need(t.eval_steps >= 0, f"--eval_steps must be >= 0 (0 = only at the end), got {t.eval_steps}")
    _need(t.save_steps >= 0, f"--save_steps must be >= 0 (0 = never), got {t.save_steps}")
    _need(t.save_total_limit >= 0, f"--save_total_limit must be >= 0 (checkpoints kept; 0 keeps all), got {t.save_total_limit}")
    _need(t.nonfinite in ("raise", "skip"), f"--nonfinite must be raise or skip, got {t.nonfinite!r}")
    _need(t.nonfinite_patience >= 1, f"--nonfinite_patience must be >= 1, got {t.nonfinite_patience}")
    _need(t.malloc_trim_steps >= 0, f"--malloc_trim_steps must be >= 0 (0 = never), got {t.malloc_trim_steps}")
    _need(t.dist_timeout_s >= 1, f"--dist_timeout_s must be >= 1 second, got {t.dist_timeout_s}; the default is 1800")
    _need(t.checkpoint_verify in VERIFY_MODES, f"--checkpoint_verify must be one of {', '.join(VERIFY_MODES)}, got {t.checkpoint_verify!r}")
    parse_signals(t.preempt_signals)
    targets = {x.strip() for x in t.report_to.split(",") if x.strip()} - {"none"}
    unknown = targets - {"jsonl", "tensorboard", "wandb"}
    _need(not unknown, f"--report_to: unknown {sorted(unknown)}; use jsonl, tensorboard, wandb or none")
    if t.resume not in ("auto", "never"):
        _need(Path(t.resume).is_dir(), f"--resume {t.resume}: no such directory; pass a checkpoints/step_* directory, auto or never")
    out = Path(t.output_dir)
    _need(not out.exists() or out.is_dir(), f"--output_dir {t.output_dir} is a file; pass a directory")
    _need(d.eval_tokens >= 1, f"--eval_tokens must be >= 1, got {d.eval_tokens}")
    _need(d.shuffle_buffer >= 1, f"--shuffle_buffer must be >= 1, got {d.shuffle_buffer}")
    _need(bool(d.text_field.strip()), "--text_field is empty; name the column that holds the text")
    if d.tokenizer in ("offline",):
        _need(d.tokenizer_vocab_size >= 258, f"--tokenizer_vocab_size must be >= 258 (256 bytes + EOS + PAD), got {d.tokenizer_vocab_size}")


# --- data files -----------------------------------------------------------------------------

def _head(path: Path) -> bytes:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            return f.read(_SAMPLE)
    except (OSError, EOFError) as e:
        raise ConfigError(f"--data_files {path}: cannot read it ({e}); check the file") from None


def _decode(path: Path, head: bytes, option: str) -> str:
    if b"\x00" in head:
        raise ConfigError(f"{option} {path}: looks binary (NUL bytes), not {'JSON Lines' if path.suffix != '.txt' else 'text'}; "
                          f"pass text data, or --dataset parquet for Parquet files")
    try:
        return head.decode("utf-8")
    except UnicodeDecodeError as e:
        if len(head) == _SAMPLE and e.start >= len(head) - 3:  # a character cut by the sample's end
            return head[: e.start].decode("utf-8")
        raise ConfigError(f"{option} {path}: not UTF-8 text (byte {e.start}: {head[e.start:e.start + 1]!r}); "
                          f"convert it, e.g. `iconv -f latin1 -t utf-8`") from None


def _check_json(path: Path, text: str, field: str, option: str, complete: bool) -> int:
    """Returns the number of text bytes seen (an upper bound of the tokens they make)."""
    stripped = text.lstrip()
    rows: list[Any] = []
    if stripped.startswith("["):
        if complete:
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{option} {path}: not valid JSON ({e}); fix the file") from None
    else:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if not complete:
            lines = lines[:-1]  # the sample may end mid-line
        for i, line in enumerate(lines[:1000] if not complete else lines):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{option} {path}: line {i + 1} is not JSON ({e.msg}); --dataset json expects "
                                  f"one JSON object per line (JSON Lines)") from None
    n = 0
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ConfigError(f"{option} {path}: record {i + 1} is a {type(row).__name__}, not an object with a {field!r} field")
        if field not in row:
            raise ConfigError(f"{option} {path}: record {i + 1} has no {field!r} field (fields: {sorted(row)[:8]}); "
                              f"pass --text_field with the field that holds the text")
        if not isinstance(row[field], str):
            raise ConfigError(f"{option} {path}: record {i + 1}'s {field!r} is a {type(row[field]).__name__}, not text; "
                              f"pass --text_field with the field that holds the text")
        n += len(row[field].encode()) + 1
    return n


def check_data_files(d, world: int = 1) -> None:
    """Empty, binary, non-UTF-8, malformed or column-less files, and data that cannot fill one
    sequence, for ``--dataset json|text|parquet``."""
    if d.dataset not in ("json", "text", "parquet"):
        return
    from .data import _files

    for option, spec in (("--data_files", d.data_files), ("--validation_files", d.validation_files)):
        if not spec:
            continue
        total, complete_all = 0, True
        for name in _files(spec):
            path = Path(name)
            if not path.is_file():
                raise ConfigError(f"{option} {path}: not a file")
            if path.stat().st_size == 0:
                raise ConfigError(f"{option} {path}: the file is empty; pass files with text in them")
            if d.dataset == "parquet":
                _check_parquet(path, d.text_field, option)
                complete_all = False
                continue
            head = _head(path)
            complete = len(head) < _SAMPLE
            complete_all &= complete
            text = _decode(path, head, option)
            if d.dataset == "text":
                if d.text_field != "text":
                    raise ConfigError(f"--text_field {d.text_field!r}: --dataset text has a single column 'text'; drop --text_field")
                total += len(text.encode()) + text.count("\n") + 1
            else:
                total += _check_json(path, text, d.text_field, option, complete)
        # Each token holds >= 1 byte (byte-level tokenizers) and each document adds one EOS, so
        # `total` bounds the tokens from above: below seq_len no sequence can be filled.
        if complete_all and total < d.seq_len + 1:
            raise ConfigError(f"{option} {spec}: at most {total} tokens of text, fewer than one sequence of --seq_len "
                              f"{d.seq_len}; pass more data or a smaller --seq_len")


def _check_parquet(path: Path, field: str, option: str) -> None:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PAR1":
        raise ConfigError(f"{option} {path}: not a Parquet file (no PAR1 header); use --dataset json or text for text files")
    try:
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
    except Exception as e:  # a damaged footer: pyarrow's own error types vary by version
        raise ConfigError(f"{option} {path}: unreadable Parquet ({type(e).__name__}: {str(e)[:200]})") from None
    if field not in names:
        raise ConfigError(f"{option} {path}: no column {field!r} (columns: {names[:8]}); pass --text_field with the text column")
