"""Which parallelism a run uses, and wrapping the model for it.

``accelerate launch`` passes the chosen config to the processes as environment variables
(``ACCELERATE_USE_FSDP``, ``FSDP_VERSION``, ``ACCELERATE_USE_DEEPSPEED``...). Accelerate builds
its FSDP state only on accelerators: on the CPU it silently falls back to DDP. So FSDP is
applied here, by us, on every device: ``fully_shard`` (FSDP2) or
``FullyShardedDataParallel(use_orig_params=True)`` (FSDP1) over the gloo or NCCL group that
Accelerate initialised. One code path runs on a laptop and on a cluster, the CPU tests cover
it, and big models are built on the meta device and materialised shard by shard.

DDP and DeepSpeed go through ``accelerator.prepare`` as usual. DeepSpeed on the CPU
(``DS_ACCELERATOR=cpu`` with configs/accelerate/deepspeed_zero*.yaml) gets a gloo group from the
trainer (see ``loop.setup_runtime``): Accelerate's ``cpu=True`` would build no DeepSpeed state.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from .config import ConfigError


def _env_flag(name: str, default: bool = False) -> bool:
    return os.environ.get(name, str(default)).strip().lower() in ("1", "true", "yes")


def detect_strategy(requested: str, world_size: int) -> str:
    """``auto`` -> what the accelerate config asked for; ``none`` for a single process."""
    if requested != "auto":
        strategy = requested
    elif _env_flag("ACCELERATE_USE_DEEPSPEED"):
        strategy = "deepspeed"
    elif _env_flag("ACCELERATE_USE_FSDP"):
        strategy = "fsdp1" if os.environ.get("FSDP_VERSION", "1").strip() == "1" else "fsdp2"
    else:
        strategy = "ddp" if world_size > 1 else "none"
    if strategy == "deepspeed" and not torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu":
        raise ConfigError(
            "DeepSpeed needs a GPU or DeepSpeed's CPU accelerator: on this machine set "
            "DS_ACCELERATOR=cpu (with configs/accelerate/deepspeed_zero{1,2,3}.yaml and "
            "--num_processes 2), or use configs/accelerate/cpu_fsdp2.yaml or cpu_ddp.yaml"
        )
    return strategy


@dataclass
class Wrapped:
    """The model as the loop uses it."""

    model: nn.Module
    strategy: str
    self_managed: bool  # True: FSDP applied here, checkpointed with torch.distributed.checkpoint


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    return list(model.model.layers)


def apply_fsdp2(model: nn.Module, device: torch.device, bf16: bool, reshard_after_forward: bool) -> nn.Module:
    """``fully_shard`` every decoder layer, then the root (embedding, final norm, head).

    Parameters become DTensors ``Shard(0)`` over a 1-D mesh of all ranks. With bf16 the shards
    stay fp32 (HTMuon and AdamW state in fp32) and are gathered in bf16; gradients reduce in fp32.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        # The last layer is gathered again at once by backward: keeping it saves one all-gather.
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward and i < len(layers) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    return model


def apply_fsdp1(model: nn.Module, device: torch.device, bf16: bool) -> nn.Module:
    """FSDP1 with ``use_orig_params=True`` (HTMuon needs the original parameters; call
    :func:`htmuon_dist.attach_fsdp1` after building the optimizer)."""
    import functools

    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import MixedPrecision, ShardingStrategy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    layer_cls = {type(decoder_layers(model)[0])}
    mp = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, buffer_dtype=torch.float32) if bf16 else None
    return FSDP(
        model,
        auto_wrap_policy=functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=layer_cls),
        sharding_strategy=ShardingStrategy.FULL_SHARD,
        mixed_precision=mp,
        use_orig_params=True,
        # Explicit: FSDP1 runs on the CPU only when told so, and only as plain "cpu".
        device_id=torch.device("cpu") if device.type == "cpu" else device,
        sync_module_states=False,  # every rank initialised the same weights (seeded per name)
    )


def set_gradient_sync(model: nn.Module, strategy: str, enabled: bool, accelerator: Any):
    """A context manager: gradients are reduced across ranks only when ``enabled`` (the last
    micro-batch of an accumulation window).

    DeepSpeed reduces and steps at its engine's accumulation boundary, which Accelerate's
    ``backward`` sets from ``accelerator.sync_gradients`` (and steps the engine when it is set):
    left at its default True, that was a DeepSpeed step per micro-batch."""
    import contextlib

    if strategy == "deepspeed":
        accelerator.sync_gradients = enabled
        return contextlib.nullcontext()
    if enabled or strategy == "none":
        if strategy == "fsdp2":
            model.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if strategy == "fsdp2":
        model.set_requires_gradient_sync(False)
        return contextlib.nullcontext()
    return model.no_sync()  # DDP and FSDP1


def clip_grad_norm(model: nn.Module, strategy: str, max_norm: float) -> Optional[torch.Tensor | float]:
    """Clips the global gradient norm (over all shards) and returns it as a plain scalar tensor.
    With ``max_norm <= 0`` only measures it. DeepSpeed's engine clipped already (its
    ``gradient_clipping``, set from the same option) inside ``backward``: its pre-clip norm, a
    float (None where the engine computed none)."""
    if strategy == "deepspeed":
        return model.get_global_grad_norm()
    limit = max_norm if max_norm > 0 else float("inf")
    if strategy == "fsdp1":
        return model.clip_grad_norm_(limit)
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, limit)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
