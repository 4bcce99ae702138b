"""Fail fast: a GPU accelerate config (or ``--device cuda``) on a machine without CUDA stops
before any work with one line naming the config and the CPU config to use instead."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import ACCELERATE, REPO, TINY, env_for, free_port, launch
from htmuon_dist.training.preflight import NoGPUError, check_devices, gpu_request, require_cuda

GPU_ENV = {"ACCELERATE_USE_CPU": "False", "ACCELERATE_MIXED_PRECISION": "bf16",
           "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}


def no_cuda() -> bool:
    return False


def test_gpu_request_reads_the_launch_variables():
    assert gpu_request(GPU_ENV) == "mixed_precision bf16"
    assert gpu_request({**GPU_ENV, "ACCELERATE_MIXED_PRECISION": "no"}) is None  # cpu_*.yaml
    assert gpu_request({**GPU_ENV, "ACCELERATE_USE_CPU": "true"}) is None
    assert gpu_request({}) is None  # plain python / torchrun: nothing asked of the devices
    ds = {"ACCELERATE_USE_CPU": "False", "ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_DEEPSPEED": "true"}
    assert gpu_request(ds) == "DeepSpeed without DS_ACCELERATOR=cpu"
    assert gpu_request({**ds, "DS_ACCELERATOR": "cpu"}) is None


@pytest.mark.parametrize("env,cpu_config", [
    (GPU_ENV, "cpu_fsdp2.yaml"),
    ({**GPU_ENV, "FSDP_VERSION": "1"}, "cpu_fsdp1.yaml"),
    ({"ACCELERATE_USE_CPU": "False", "ACCELERATE_MIXED_PRECISION": "bf16"}, "cpu_ddp.yaml"),
])
def test_check_devices_names_the_config_and_the_cpu_one(env, cpu_config):
    with pytest.raises(NoGPUError) as err:
        check_devices(False, env, no_cuda, config_file="configs/accelerate/fsdp2.yaml")
    msg = str(err.value)
    assert "configs/accelerate/fsdp2.yaml" in msg and cpu_config in msg and "--allow_cpu" in msg
    assert "\n" not in msg
    check_devices(True, env, no_cuda, config_file=None)  # on purpose: no error
    check_devices(False, env, lambda: True, config_file=None)  # a GPU is there: no error


def test_deepspeed_without_its_cpu_accelerator_is_told_to_set_it():
    ds = {"ACCELERATE_USE_CPU": "False", "ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_DEEPSPEED": "true"}
    with pytest.raises(NoGPUError) as err:
        check_devices(False, ds, no_cuda, config_file="configs/accelerate/deepspeed_zero3.yaml")
    msg = str(err.value)
    assert "DeepSpeed without DS_ACCELERATOR=cpu" in msg and "set DS_ACCELERATOR=cpu" in msg and "cpu_fsdp2.yaml" in msg
    assert "--allow_cpu" not in msg  # it would not help: DeepSpeed must be told its accelerator
    check_devices(False, {**ds, "DS_ACCELERATOR": "cpu"}, no_cuda, config_file=None)


def test_a_cpu_config_with_a_gpu_override_gets_the_matching_hint():
    with pytest.raises(NoGPUError, match="without --mixed_precision bf16"):
        check_devices(False, GPU_ENV, no_cuda, config_file="configs/accelerate/cpu_fsdp2.yaml")


def test_require_cuda():
    assert require_cuda("cpu", cuda_available=no_cuda) == "cpu"
    assert require_cuda("cuda", cuda_available=lambda: True) == "cuda"
    assert require_cuda("cuda:1", allow_cpu=True, cuda_available=no_cuda) == "cpu"
    with pytest.raises(NoGPUError, match="--device cuda:1 but no CUDA device is visible; use --device cpu"):
        require_cuda("cuda:1", cuda_available=no_cuda)


def test_launcher_config_file_is_read_from_the_parent_process():
    """A child started with ``--config_file X`` finds X from its own process (its parent)."""
    if not os.path.exists("/proc/self/cmdline"):
        pytest.skip("no /proc on this OS: the message then says 'the accelerate launch'")
    code = ("import os; from htmuon_dist.training.preflight import launcher_config_file as f; "
            "print(f(os.getpid()))")
    out = subprocess.run([sys.executable, "-c", code, "--config_file", "configs/accelerate/x.yaml"],
                         capture_output=True, text=True, cwd=REPO, check=True).stdout.strip()
    assert out == "configs/accelerate/x.yaml"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_gpu_config_on_a_cpu_machine_exits_at_once(tmp_path):
    env = env_for(tmp_path)
    env.pop("DS_ACCELERATOR", None)
    cmd = [ACCELERATE, "launch", "--config_file", "configs/accelerate/fsdp2.yaml", "--num_processes", "2",
           "--main_process_port", str(free_port()), "launch/train.py", *TINY, "--max_steps", "2",
           "--output_dir", str(tmp_path / "out")]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - start
    assert proc.returncode != 0
    assert ("htmuon-train: error: the accelerate config configs/accelerate/fsdp2.yaml asks for GPUs "
            "(mixed_precision bf16) but no CUDA device is visible") in proc.stderr
    assert proc.stderr.count("htmuon-train: error:") == 1  # once per node, not once per process
    assert "--config_file configs/accelerate/cpu_fsdp2.yaml" in proc.stderr
    assert not (tmp_path / "out").exists()  # stopped before any work
    assert took < 60, f"took {took:.0f} s"  # interpreter + torch import, nothing else (~7 s here)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_allow_cpu_runs_a_gpu_config_on_the_cpu(cache_dir, tmp_path):
    out = tmp_path / "out"
    proc = launch(cache_dir, "fsdp2.yaml", [*TINY, "--max_steps", "2", "--output_dir", str(out),
                                            "--allow_cpu", "true", "--export_model", "false"],
                  extra_launch=["--num_processes", "2"])
    assert proc.returncode == 0
    assert (out / "metrics.jsonl").exists()
