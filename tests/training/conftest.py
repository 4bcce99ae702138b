"""Helpers for the training tests: a shared offline cache and multi-process launches."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
ACCELERATE = str(Path(PYTHON).with_name("accelerate"))
# Small enough for 2 cores: 8 sequences of 64 tokens per rank and step.
TINY = ["--config", "configs/train/tiny_cpu.yaml", "--seq_len", "64", "--micro_batch_size", "4",
        "--total_batch_size", "8", "--warmup_steps", "2", "--eval_tokens", "2048", "--logging_steps", "1",
        "--eval_steps", "0", "--report_to", "jsonl", "--plot", "false", "--progress_bar", "false"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """A private corpus/tokenizer cache, built once per session (~10 s)."""
    path = tmp_path_factory.mktemp("htmuon_cache")
    os.environ["HTMUON_CACHE"] = str(path)
    from htmuon_dist.training.config import DataArguments
    from htmuon_dist.training.data import load_tokenizer

    load_tokenizer(DataArguments(cache_dir=str(path)))
    return path


def env_for(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HTMUON_CACHE=str(cache), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false")
    env.pop("ACCELERATE_USE_FSDP", None)
    return env


def launch(cache: Path, accelerate_config: str | None, args: list[str], timeout: int = 240,
           extra_launch: list[str] | None = None, check: bool = True,
           extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``accelerate launch [--config_file configs/accelerate/X] launch/train.py ARGS`` (or plain
    python for a single process), with ``extra_env`` on top of :func:`env_for`'s; raises with
    the output if it fails and ``check``."""
    if accelerate_config is None:
        cmd = [PYTHON, "launch/train.py", *args]
    else:
        cmd = [ACCELERATE, "launch", "--config_file", f"configs/accelerate/{accelerate_config}",
               "--main_process_port", str(free_port()), *(extra_launch or []), "launch/train.py", *args]
    env = {**env_for(cache), **(extra_env or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def _metric_rows(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def train_rows(output_dir: Path) -> dict[int, dict]:
    """step -> that step's training row (loss, grad_norm, lr...) of metrics.jsonl."""
    return {r["step"]: r for r in _metric_rows(output_dir) if "loss" in r}


def metrics(output_dir: Path) -> tuple[dict[int, float], list[dict]]:
    """step -> train loss, and the eval rows, from metrics.jsonl."""
    rows = _metric_rows(output_dir)
    return {r["step"]: r["loss"] for r in rows if "loss" in r}, [r for r in rows if "eval_loss" in r]


def assert_export_reproduces_probe(export: Path) -> None:
    """The exported model loads in this one process and gives the logits the run recorded."""
    import torch
    from transformers import LlamaForCausalLM

    assert (export / "model.safetensors").is_file() and (export / "config.json").is_file()
    model = LlamaForCausalLM.from_pretrained(str(export)).eval()
    probe = torch.load(export / "probe_logits.pt")
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"]).logits
    torch.testing.assert_close(logits, probe["logits"], rtol=1e-4, atol=1e-4)
