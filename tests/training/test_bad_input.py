"""Validation at the boundary (issue #14 item 3): each row is a bad input a new user might
give ``htmuon-train``. Every one must end with exit status 2 and a single stderr line
``htmuon-train: configuration error: ...`` that names the option or file, with no traceback.

Rows run in this process through :func:`htmuon_dist.training.cli.main` (most fail in the
pre-flight checks, before any process group exists); a few run as real subprocesses to check
the process exit status as well."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, env_for

BASE = ["--config", "configs/train/tiny_cpu.yaml", "--seq_len", "64", "--micro_batch_size", "4",
        "--total_batch_size", "8", "--max_steps", "2", "--warmup_steps", "1", "--eval_tokens", "256",
        "--report_to", "jsonl", "--plot", "false", "--progress_bar", "false", "--export_model", "false",
        "--save_steps", "0"]
PROSE = "Return the sum of the two numbers, raising ValueError when either is negative. "


def _files(d: Path) -> dict[str, str]:
    """Bad (and a few good) data and config files for the table; name -> path."""
    def w(name: str, data: str | bytes) -> str:
        p = d / name
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
        return str(p)

    long_docs = "".join(json.dumps({"text": PROSE * 3}) + "\n" for _ in range(60))
    tiny = json.loads((REPO / "configs/model/tiny.json").read_text())
    return {
        "empty": w("empty.jsonl", ""),
        "binary": w("binary.jsonl", bytes(range(256)) * 8),
        "latin1": w("latin1.txt", ("caf\xe9 na\xefve r\xe9sum\xe9 " * 50).encode("latin-1")),
        "no_text": w("no_text.jsonl", "".join(json.dumps({"content": PROSE}) + "\n" for _ in range(40))),
        "not_string": w("not_string.jsonl", "".join(json.dumps({"text": [1, 2]}) + "\n" for _ in range(40))),
        "not_json": w("not_json.jsonl", "this is plain text, not JSON\n" * 20),
        "short": w("short.jsonl", "".join(json.dumps({"text": "hi"}) + "\n" for _ in range(5))),
        # More bytes than one 64-token sequence, fewer tokens: only tokenisation can tell.
        "short_tokens": w("short_tokens.jsonl", "".join(json.dumps({"text": "Return the value of the object."}) + "\n" for _ in range(3))),
        "long": w("long.jsonl", long_docs),
        "fake_parquet": w("fake.parquet", long_docs),
        "bad_yaml": w("bad.yaml", "train:\n  lr: [0.1\n  max_steps: 3\n"),
        "yaml_list": w("list.yaml", "- lr\n- 0.1\n"),
        "yaml_typo": w("typo.yaml", "train:\n  max_step: 10\n"),
        "yaml_type": w("type.yaml", "train:\n  lr: [1, 2]\n"),
        "yaml_word": w("word.yaml", "train:\n  seed: many\n"),
        "yaml_bool": w("bool.yaml", "train:\n  mixed_precision: no\n"),
        "model_bad_json": w("model_bad.json", '{"hidden_size": 64,'),
        "model_neg": w("model_neg.json", json.dumps({**tiny, "hidden_size": -8})),
        "model_key": w("model_key.json", json.dumps({**tiny, "hidden_sise": 64})),
        "model_list": w("model_list.json", "[1, 2, 3]"),
        "a_file": w("a_file", "not a directory"),
    }


# (row id, extra argv (with {name} placeholders for _files), text the message must contain)
ROWS = [
    ("power", ["--power", "1.5"], "--power"),
    ("lr_negative", ["--lr", "-0.1"], "--lr"),
    ("lr_word", ["--lr", "abc"], "--lr"),
    ("momentum_one", ["--momentum", "1.0"], "--momentum"),
    ("spectral_bogus", ["--spectral_method", "bogus"], "--spectral_method"),
    ("ns5_with_power", ["--spectral_method", "ns5", "--power", "0.5"], "--spectral_method ns5"),
    ("interval_zero", ["--optimizer", "htmuon_interval", "--interval", "0"], "--interval"),
    ("optimizer_typo", ["--optimizer", "adamw2"], "--optimizer"),
    ("max_steps_zero", ["--max_steps", "0"], "--max_steps"),
    ("weight_decay", ["--weight_decay", "-1"], "--weight_decay"),
    ("grad_clip", ["--grad_clip", "-1"], "--grad_clip"),
    ("min_lr_ratio", ["--min_lr_ratio", "2"], "--min_lr_ratio"),
    ("logging_steps", ["--logging_steps", "0"], "--logging_steps"),
    ("save_total_limit", ["--save_total_limit", "-1"], "--save_total_limit"),
    ("nonfinite", ["--nonfinite", "ignore"], "--nonfinite"),
    ("nonfinite_patience", ["--nonfinite_patience", "0"], "--nonfinite_patience"),
    ("dist_timeout", ["--dist_timeout_s", "0"], "--dist_timeout_s"),
    ("checkpoint_verify", ["--checkpoint_verify", "md5"], "--checkpoint_verify"),
    ("preempt_signal", ["--preempt_signals", "SIGFOO"], "--preempt_signals"),
    ("report_to", ["--report_to", "slack"], "--report_to"),
    ("resume_missing", ["--resume", "/nonexistent/step_1"], "--resume"),
    ("seq_len_one", ["--seq_len", "1"], "--seq_len"),
    ("seq_len_huge", ["--seq_len", "100000"], "--seq_len"),
    ("batch_arith", ["--total_batch_size", "10"], "--total_batch_size"),
    ("eval_tokens", ["--eval_tokens", "0"], "--eval_tokens"),
    ("vocab_small", ["--tokenizer_vocab_size", "100"], "--tokenizer_vocab_size"),
    ("bf16_on_cpu", ["--mixed_precision", "bf16"], "--mixed_precision"),
    ("unknown_flag", ["--learning_rate", "0.1"], "learning_rate"),
    ("output_is_file", ["--output_dir", "{a_file}"], "--output_dir"),
    ("config_missing", ["--config", "{empty}.yaml"], "--config"),
    ("yaml_malformed", ["--config", "{bad_yaml}"], "bad.yaml"),
    ("yaml_list", ["--config", "{yaml_list}"], "list.yaml"),
    ("yaml_typo", ["--config", "{yaml_typo}"], "max_steps"),
    ("yaml_type", ["--config", "{yaml_type}"], "--lr"),
    ("yaml_word", ["--config", "{yaml_word}"], "--seed"),
    ("yaml_unquoted_no", ["--config", "{yaml_bool}"], "--mixed_precision"),
    ("model_missing", ["--model", "my_model.json"], "my_model.json"),
    ("model_bad_json", ["--model", "{model_bad_json}"], "model_bad.json"),
    ("model_negative", ["--model", "{model_neg}"], "hidden_size"),
    ("model_unknown_key", ["--model", "{model_key}"], "hidden_sise"),
    ("model_list", ["--model", "{model_list}"], "model_list.json"),
    ("overrides_list", ["--model_overrides", "[1]"], "--model_overrides"),
    ("overrides_bad", ["--model_overrides", "{{bad"], "--model_overrides"),
    ("json_without_files", ["--dataset", "json"], "--data_files"),
    ("files_no_match", ["--dataset", "json", "--data_files", "/nonexistent/*.jsonl"], "--data_files"),
    ("data_empty", ["--dataset", "json", "--data_files", "{empty}"], "empty.jsonl"),
    ("data_binary", ["--dataset", "json", "--data_files", "{binary}"], "binary.jsonl"),
    ("data_latin1", ["--dataset", "text", "--data_files", "{latin1}"], "latin1.txt"),
    ("data_no_text_column", ["--dataset", "json", "--data_files", "{no_text}"], "--text_field"),
    ("data_not_string", ["--dataset", "json", "--data_files", "{not_string}"], "not_string.jsonl"),
    ("data_not_json", ["--dataset", "json", "--data_files", "{not_json}"], "not_json.jsonl"),
    ("data_too_short", ["--dataset", "json", "--data_files", "{short}"], "--seq_len"),
    ("data_too_short_tokens", ["--dataset", "json", "--data_files", "{short_tokens}", "--validation_files", "{long}"], "--seq_len"),
    ("data_text_field_for_text", ["--dataset", "text", "--data_files", "{long}", "--text_field", "body"], "--text_field"),
    ("data_fake_parquet", ["--dataset", "parquet", "--data_files", "{fake_parquet}"], "fake.parquet"),
    ("dataset_typo", ["--dataset", "jsonl", "--data_files", "{long}"], "--dataset"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    return _files(tmp_path_factory.mktemp("bad_inputs"))


def _argv(extra: list[str], files: dict[str, str], out: Path) -> list[str]:
    return [*BASE, "--output_dir", str(out), *(a.format(**files) for a in extra)]


def _check(rc: int, stderr: str, needle: str) -> None:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert rc == 2, f"exit status {rc}, stderr:\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [ln for ln in lines if ln.startswith("htmuon-train: configuration error: ")]
    assert len(errors) == 1, f"want one configuration-error line, got:\n{stderr[-3000:]}"
    assert needle in errors[0], f"{needle!r} not named in: {errors[0]}"


def test_the_table_has_at_least_30_rows():
    assert len(ROWS) >= 30 and len({r[0] for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize("extra, needle", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_is_one_line_and_status_2(extra, needle, files, cache_dir, tmp_path, capsys, monkeypatch):
    from htmuon_dist.training.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    for var in ("WORLD_SIZE", "RANK", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(var, raising=False)
    rc = main(_argv(extra, files, tmp_path / "out"))
    _check(rc, capsys.readouterr().err, needle)


@pytest.mark.parametrize("extra, needle", [
    (["--power", "1.5"], "--power"),
    (["--config", "{bad_yaml}"], "bad.yaml"),
    (["--dataset", "json", "--data_files", "{empty}"], "empty.jsonl"),
])
def test_process_exit_status_is_2(extra, needle, files, cache_dir, tmp_path):
    proc = subprocess.run([PYTHON, "launch/train.py", *_argv(extra, files, tmp_path)], cwd=REPO,
                          env=env_for(cache_dir), capture_output=True, text=True, timeout=120)
    _check(proc.returncode, proc.stderr, needle)


def test_a_good_file_passes_preflight(files, tmp_path):
    """The checks must not reject good input (the same base arguments, valid JSON Lines)."""
    from htmuon_dist.training.config import parse_args
    from htmuon_dist.training.validate import preflight

    preflight(parse_args(_argv(["--dataset", "json", "--data_files", "{long}"], files, tmp_path)))
    preflight(parse_args(_argv(["--dataset", "text", "--data_files", "{long}"], files, tmp_path)))
    preflight(parse_args(_argv(["--optimizer", "htmuon_interval", "--interval", "3"], files, tmp_path)))
