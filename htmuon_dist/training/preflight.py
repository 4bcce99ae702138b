"""Fail fast when a run asks for GPUs that this machine does not have.

Without this, ``accelerate launch --config_file configs/accelerate/fsdp2.yaml ...`` on a CPU-only
machine trains silently on the CPU over gloo: the GPU configs and the CPU configs differ only
in ``mixed_precision`` (bf16 vs 'no') and their names, because both must say
``use_cpu: false`` for Accelerate to start the processes with torchrun.

:func:`check_devices` runs before any heavy import or work (one call from
:func:`htmuon_dist.training.cli.main`); :func:`require_cuda` does the same for scripts with an
explicit ``--device cuda``. Both are pure functions of the environment they are given, so they
are tested on this CPU machine directly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Mapping, Optional

# accelerate's distributed_type / launch variables -> the CPU config to use instead.
CPU_CONFIGS = {
    "fsdp2": "configs/accelerate/cpu_fsdp2.yaml",
    "fsdp1": "configs/accelerate/cpu_fsdp1.yaml",
    "ddp": "configs/accelerate/cpu_ddp.yaml",
    "deepspeed": "configs/accelerate/cpu_fsdp2.yaml",  # or the same config with DS_ACCELERATOR=cpu
}
GPU_PRECISIONS = ("bf16", "fp16", "fp8")


class NoGPUError(RuntimeError):
    """A GPU run was requested on a machine without a visible CUDA device."""


def _truthy(value: Optional[str]) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes")


def launcher_config_file(pid: Optional[int] = None, depth: int = 3) -> Optional[str]:
    """The ``--config_file`` of the ``accelerate launch`` that started this process, if any.

    Accelerate does not export the path; its launcher is this process's parent (torchrun runs
    inside it) or grandparent, so it is read from ``/proc/<pid>/cmdline`` (Linux; None elsewhere).
    """
    pid = os.getppid() if pid is None else pid
    for _ in range(depth):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return None
        words = [a.decode(errors="replace") for a in args if a]
        for i, w in enumerate(words):
            if w == "--config_file" and i + 1 < len(words):
                return words[i + 1]
            if w.startswith("--config_file="):
                return w.split("=", 1)[1]
        ppid = next((line.split()[1] for line in status.splitlines() if line.startswith("PPid:")), "0")
        pid = int(ppid)
        if pid <= 1:
            return None
    return None


def requested_strategy(env: Mapping[str, str]) -> str:
    """The parallel strategy the accelerate launch variables describe (fsdp1/fsdp2/deepspeed/ddp)."""
    if _truthy(env.get("ACCELERATE_USE_DEEPSPEED")):
        return "deepspeed"
    if _truthy(env.get("ACCELERATE_USE_FSDP")):
        return "fsdp1" if env.get("FSDP_VERSION", "1").strip() == "1" else "fsdp2"
    return "ddp"


def gpu_request(env: Mapping[str, str]) -> Optional[str]:
    """Why the launch environment asks for GPUs, or None when it does not.

    A GPU request is an ``accelerate launch`` with ``use_cpu`` false and a GPU precision
    (the shipped GPU configs: bf16), or DeepSpeed without ``DS_ACCELERATOR=cpu``.
    """
    launched = "ACCELERATE_MIXED_PRECISION" in env or "ACCELERATE_USE_CPU" in env
    if not launched or _truthy(env.get("ACCELERATE_USE_CPU")):
        return None
    precision = env.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower()
    if precision in GPU_PRECISIONS:
        return f"mixed_precision {precision}"
    if _truthy(env.get("ACCELERATE_USE_DEEPSPEED")) and env.get("DS_ACCELERATOR", "").lower() != "cpu":
        return "DeepSpeed without DS_ACCELERATOR=cpu"
    return None


def check_devices(
    allow_cpu: bool,
    env: Optional[Mapping[str, str]] = None,
    cuda_available: Optional[Callable[[], bool]] = None,
    config_file: Optional[str] = "auto",
) -> None:
    """Raises :class:`NoGPUError` (one line: the config, and the CPU config to use) when the
    launch asks for GPUs and none is visible, unless ``allow_cpu``.

    Args:
        allow_cpu: the trainer's ``--allow_cpu``: run on the CPU on purpose.
        env: the environment (default ``os.environ``).
        cuda_available: default ``torch.cuda.is_available``.
        config_file: the accelerate config's path for the message; "auto" reads the launcher's.
    """
    env = os.environ if env is None else env
    reason = gpu_request(env)
    if reason is None or allow_cpu:
        return
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available
    if cuda_available():
        return
    if config_file == "auto":
        config_file = launcher_config_file()
    what = f"the accelerate config {config_file}" if config_file else "the accelerate launch"
    cpu = CPU_CONFIGS[requested_strategy(env)]
    visible = env.get("CUDA_VISIBLE_DEVICES")
    hint = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
    tail = ", or pass --allow_cpu true to run on the CPU on purpose"
    if config_file and Path(config_file).name.startswith("cpu_"):
        # a CPU config with a GPU override on the launch line (accelerate launch --mixed_precision bf16)
        fix = "launch it without --mixed_precision bf16 (the CPU configs say 'no')"
    elif reason.startswith("DeepSpeed"):
        fix = f"set DS_ACCELERATOR=cpu (DeepSpeed's CPU accelerator, gloo) or use --config_file {cpu}"
        tail = ""  # --allow_cpu cannot help: DeepSpeed must be told its accelerator
    else:
        fix = f"use --config_file {cpu}"
    raise NoGPUError(f"{what} asks for GPUs ({reason}) but no CUDA device is visible{hint}; on this machine {fix}{tail}")


def require_cuda(device: str, allow_cpu: bool = False, option: str = "--device",
                 cuda_available: Optional[Callable[[], bool]] = None) -> str:
    """For scripts with an explicit device: ``"cuda"``/``"cuda:N"`` without a visible CUDA
    device raises :class:`NoGPUError` naming ``option``; with ``allow_cpu`` it returns "cpu"."""
    if not str(device).startswith("cuda"):
        return device
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available
    if cuda_available():
        return device
    if allow_cpu:
        return "cpu"
    raise NoGPUError(f"{option} {device} but no CUDA device is visible; use {option} cpu")

