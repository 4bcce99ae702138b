"""The container entrypoint, outside a container: two "nodes" on 127.0.0.1, 2 CPU processes each.

Each node runs ``docker/entrypoint.sh --config_file configs/accelerate/cpu_fsdp2.yaml -- <tiny
training args>`` with only NNODES / NODE_RANK / NPROC_PER_NODE / MASTER_ADDR / MASTER_PORT set,
as a cluster would set them; the entrypoint must turn those into the two halves of one
4-process FSDP2 run of the tiny CPU training config (configs/train/tiny_cpu.yaml).
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.multirank, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
STEPS = 4
# The tiny CPU config, cut down for 2 shared cores: 8 sequences of 64 tokens per step over 4 ranks.
TRAIN_ARGS = ["--config", "configs/train/tiny_cpu.yaml", "--seq_len", "64", "--micro_batch_size", "2",
              "--total_batch_size", "8", "--warmup_steps", "1", "--max_steps", str(STEPS), "--save_steps", str(STEPS),
              "--eval_tokens", "2048", "--eval_steps", "0", "--logging_steps", "1", "--report_to", "jsonl",
              "--plot", "false", "--progress_bar", "false", "--export_model", "false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_env(cache: Path, rank: int, port: int) -> dict[str, str]:
    # Nothing a real launcher or an outer test run may have left behind.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "PET_", "ACCELERATE_", "FSDP_", "KUBERNETES_"))
           and k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID")}
    env.update(PYTHON=sys.executable, NNODES="2", NODE_RANK=str(rank), NPROC_PER_NODE="2",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", HTMUON_CACHE=str(cache),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """The offline corpus and tokenizer, built once here so that the four ranks only read it."""
    path = tmp_path_factory.mktemp("htmuon_cache")
    from htmuon_dist.training.config import DataArguments
    from htmuon_dist.training.data import load_tokenizer

    load_tokenizer(DataArguments(cache_dir=str(path)))
    return path


def test_entrypoint_runs_two_nodes_of_two_processes(cache, tmp_path):
    out = tmp_path / "run"
    port = _free_port()
    procs = [subprocess.Popen(["bash", "docker/entrypoint.sh", "--config_file", "configs/accelerate/cpu_fsdp2.yaml",
                               "--", *TRAIN_ARGS, "--output_dir", str(out)],
                              cwd=REPO, env=_node_env(cache, rank, port), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=200)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(log[-3000:] for log in logs)

    # Each node printed where its numbers came from and launched its half of the job.
    for rank, log in enumerate(logs):
        assert (f"htmuon-launch: env: 2 node(s) [NNODES] x 2 process(es) [NPROC_PER_NODE] = 4; "
                f"this node {rank} [NODE_RANK]; rendezvous 127.0.0.1:{port}") in log

    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 4 and summary["strategy"] == "fsdp2" and summary["step"] == STEPS
    assert summary["optimizer_class"] == "HTMuon"
    assert summary["dtensor_params"] == summary["param_tensors"] > 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert all(math.isfinite(v) for v in losses.values())
    assert losses[STEPS] < losses[1], f"loss did not fall: {losses}"
    # All four ranks, two on each "node", wrote their part of the checkpoint.
    ckpt = out / "checkpoints" / f"step_{STEPS:08d}"
    assert {p.name for p in ckpt.glob("data_state_rank*.json")} == {f"data_state_rank{r}.json" for r in range(4)}
