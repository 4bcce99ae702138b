"""Cluster files for GPU jobs: srun --cpus-per-task, NCCL settings documented (none forced),
the PyTorchJob's resources/RDMA/IPC_LOCK/grace period, and the CUDA 12.x image build."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "launch/slurm/train_multinode.sbatch"


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "PET_", "NCCL_", "TORCH_NCCL_")) and k not in
           ("NNODES", "NODE_RANK", "NPROC_PER_NODE", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(extra)
    return env


def _run_sbatch(tmp_path, **extra):
    fake = tmp_path / "bin" / "srun"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text('#!/usr/bin/env bash\necho "$*" > "$SRUN_ARGS"\n')
    fake.chmod(0o755)
    env = _clean_env(PATH=f"{fake.parent}:{os.environ['PATH']}", SRUN_ARGS=str(tmp_path / "args"),
                     SLURM_SUBMIT_DIR=str(REPO), OUTPUT_DIR=str(tmp_path / "out"), **extra)
    proc = subprocess.run(["bash", str(SBATCH)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return (tmp_path / "args").read_text().split(), proc.stderr


def test_srun_passes_cpus_per_task(tmp_path):
    args, _ = _run_sbatch(tmp_path, SLURM_CPUS_PER_TASK="48")
    assert "--cpus-per-task=48" in args and "--ntasks-per-node=1" in args
    args, _ = _run_sbatch(tmp_path)
    assert "--cpus-per-task=64" in args  # the #SBATCH value when run outside SLURM


def test_nccl_variables_are_documented_and_not_forced(tmp_path):
    text = SBATCH.read_text()
    for var in ("NCCL_SOCKET_IFNAME", "NCCL_IB_HCA", "NCCL_IB_GID_INDEX", "NCCL_DEBUG"):
        assert var in text
    assert not re.search(r"^\s*export\s+NCCL_", text, re.M), "the script must not force NCCL settings"
    _, stderr = _run_sbatch(tmp_path, NCCL_IB_HCA="mlx5_0")
    assert "NCCL_IB_HCA=mlx5_0" in stderr  # what the user set is passed on and logged


def test_pytorchjob_resources_rdma_and_grace_period():
    job = next(yaml.safe_load_all((REPO / "launch/k8s/pytorchjob.yaml").read_text()))
    text = (REPO / "launch/k8s/pytorchjob.yaml").read_text()
    assert "until the DeepSpeed integration" not in text  # the stale comment is gone
    for role in ("Master", "Worker"):
        pod = job["spec"]["pytorchReplicaSpecs"][role]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] >= 60
        c = pod["containers"][0]
        assert "IPC_LOCK" in c["securityContext"]["capabilities"]["add"]
        req, lim = c["resources"]["requests"], c["resources"]["limits"]
        assert int(req["cpu"]) > 0 and req["memory"].endswith("Gi")
        assert req["nvidia.com/gpu"] == lim["nvidia.com/gpu"] == int(job["spec"]["nprocPerNode"])
        assert any(k.startswith("rdma/") for k in lim)


def test_cuda12_build_argument():
    dockerfile = (REPO / "docker/Dockerfile.cuda").read_text()
    assert "ARG TORCH_WHEELS=" in dockerfile and "download.pytorch.org/whl/${TORCH_WHEELS}" in dockerfile
    env = _clean_env(DRY_RUN="1", CUDA="12.8")
    out = subprocess.run(["bash", "docker/build.sh", "cuda"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout.split()
    assert "htmuon-dist:0.1.0-cuda-cu128" in out
    for arg in ("CUDA_VERSION=12.8.1", "TORCH_CUDA=12.8", "TORCH_WHEELS=cu128"):
        assert arg in out
    bad = subprocess.run(["bash", "docker/build.sh", "cuda"], cwd=REPO, env=dict(env, CUDA="11.8"),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "CUDA=11.8 is not one of" in bad.stderr
