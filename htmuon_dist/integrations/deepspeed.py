"""HTMuon under DeepSpeed ZeRO (stages 1, 2, 3), directly or through Accelerate.

Usage (the optimizer is DeepSpeed's *client* optimizer; the config has no "optimizer" block)::

    opt = HTMuon(param_groups(model, "reference"), lr=0.03, power=0.125)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config="configs/deepspeed/zero2.json")

HTMuon recognises ZeRO's flat partitions by itself (see
:mod:`htmuon_dist.distributed.backends.zero`). This module adds the configuration checks that
DeepSpeed and Accelerate do not do, or do silently:

- an "optimizer" block next to a client optimizer (DeepSpeed ignores the block, except for
  ``"type": "Muon"``, which tags parameters so that DeepSpeed runs its own Newton-Schulz on
  them; Accelerate refuses the pair);
- optimizer offload (Accelerate silently swaps any client optimizer for DeepSpeedCPUAdam unless
  ``zero_force_ds_cpu_optimizer`` is false; HTMuon's exchange needs the partitions on the
  accelerator);
- fp16 on the CPU (DeepSpeed's CPU accelerator has no fp16; use bf16 or fp32);
- gradient accumulation that disagrees between the config, the batch sizes and the loop.

:func:`check_config` runs them on a config; :func:`initialize` runs them and then
``deepspeed.initialize``; :func:`check_accelerate` runs them on Accelerate's active DeepSpeed
plugin. :func:`deepspeed_build_guard`, registered with :mod:`htmuon_dist.integrations`, runs
it and installs :func:`guard_use_muon` on every new HTMuon.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional, Union

import torch

from . import register_build_guard

__all__ = ["DeepSpeedConfigError", "check_config", "check_accelerate", "initialize", "load_config",
           "guard_use_muon", "deepspeed_build_guard"]

ConfigLike = Union[dict, str, os.PathLike]


class DeepSpeedConfigError(ValueError):
    """A DeepSpeed configuration that would not train with HTMuon as intended."""


def load_config(config: ConfigLike) -> dict:
    """A DeepSpeed config as a dict, from a dict, a JSON file path or a JSON string."""
    if isinstance(config, dict):
        return config
    text = str(config)
    if os.path.exists(text):
        return json.loads(Path(text).read_text())
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DeepSpeedConfigError(f"DeepSpeed config {text!r} is neither a file nor JSON") from exc


def _on_cpu() -> bool:
    return os.environ.get("DS_ACCELERATOR", "").lower() == "cpu" or not torch.cuda.is_available()


def _int(value: Any) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _enabled(section: Any) -> Any:
    return section.get("enabled", False) if isinstance(section, dict) else False


def check_config(
    config: ConfigLike,
    optimizer: Any = None,
    *,
    world_size: Optional[int] = None,
    gradient_accumulation_steps: Optional[int] = None,
    on_cpu: Optional[bool] = None,
) -> dict:
    """Checks a DeepSpeed config meant for HTMuon; returns it as a dict.

    Args:
        config: dict, JSON path or JSON string.
        optimizer: the client optimizer (an HTMuon or a callable building one), if any.
        world_size: data-parallel ranks, to check ``train_batch_size`` (default: from
            torch.distributed when initialised).
        gradient_accumulation_steps: what the training loop accumulates (e.g. Accelerate's
            ``gradient_accumulation_steps``), to compare with the config.
        on_cpu: whether DeepSpeed runs on its CPU accelerator (default: ``DS_ACCELERATOR=cpu``
            or no CUDA device).

    Raises:
        DeepSpeedConfigError: listing every problem found.
    """
    cfg = load_config(config)
    problems: list[str] = []
    if optimizer is not None and "optimizer" in cfg:
        kind = (cfg.get("optimizer") or {}).get("type", "?")
        problems.append(
            f"the config has an \"optimizer\" block (type {kind!r}) and an HTMuon client optimizer "
            f"is passed too: DeepSpeed would ignore the block (or, for type 'Muon', run its own "
            f"Newton-Schulz on the gradients before HTMuon). Delete the \"optimizer\" block"
        )
    zero = cfg.get("zero_optimization") or {}
    offload = (zero.get("offload_optimizer") or {}).get("device", "none")
    if offload not in (None, "none"):
        replaced = cfg.get("zero_force_ds_cpu_optimizer", True) is not False
        problems.append(
            f"zero_optimization.offload_optimizer.device={offload!r}: HTMuon does not support "
            f"optimizer offload (its exchange runs on the device partitions)"
            + ("; Accelerate would also silently replace HTMuon by DeepSpeedCPUAdam because "
               "zero_force_ds_cpu_optimizer is not false" if replaced else "")
            + ". Remove offload_optimizer"
        )
    normuon = any(g.get("normuon") for g in getattr(optimizer, "param_groups", []))
    if normuon and zero.get("elastic_checkpoint"):
        problems.append(
            "zero_optimization.elastic_checkpoint is true and HTMuon runs NorMuon: DeepSpeed's "
            "elastic ZeRO-1/2 checkpoint cuts every flat state tensor by the partition padding, "
            "which would truncate NorMuon's per-row state (one value per row, not per element). "
            "Set elastic_checkpoint to false (the default)"
        )
    fp16 = _enabled(cfg.get("fp16"))
    if fp16 and (on_cpu if on_cpu is not None else _on_cpu()):
        problems.append(
            "fp16 is enabled but DeepSpeed runs on the CPU accelerator, which has no fp16 "
            "(\"Type fp16 is not supported on your device\"); use \"bf16\": {\"enabled\": true} "
            "or fp32"
        )
    if fp16 is True and _enabled(cfg.get("bf16")) is True:
        problems.append("both fp16 and bf16 are enabled; choose one")
    gas = _int(cfg.get("gradient_accumulation_steps"))
    if gas is not None and gradient_accumulation_steps is not None and gas != gradient_accumulation_steps:
        problems.append(
            f"gradient_accumulation_steps is {gas} in the DeepSpeed config but the training loop "
            f"accumulates {gradient_accumulation_steps} micro-batches per optimizer step (DeepSpeed "
            f"would step every {gas}); make them equal or set the config value to \"auto\""
        )
    if world_size is None and torch.distributed.is_available() and torch.distributed.is_initialized():
        world_size = torch.distributed.get_world_size()
    micro, total = _int(cfg.get("train_micro_batch_size_per_gpu")), _int(cfg.get("train_batch_size"))
    if world_size and micro and total:
        steps = gas if gas is not None else gradient_accumulation_steps
        if steps is not None and micro * steps * world_size != total:
            problems.append(
                f"train_batch_size={total} is not train_micro_batch_size_per_gpu ({micro}) x "
                f"gradient_accumulation_steps ({steps}) x data-parallel ranks ({world_size}) = "
                f"{micro * steps * world_size}"
            )
        elif steps is None and total % (micro * world_size):
            problems.append(
                f"train_batch_size={total} is not a multiple of train_micro_batch_size_per_gpu "
                f"({micro}) x data-parallel ranks ({world_size})"
            )
    if problems:
        raise DeepSpeedConfigError(
            "DeepSpeed config not usable with HTMuon:\n  - " + "\n  - ".join(problems)
        )
    return cfg


def initialize(model: torch.nn.Module, optimizer: Any, config: ConfigLike, **kwargs: Any):
    """``check_config`` then ``deepspeed.initialize(model=..., optimizer=..., config=...)``."""
    import deepspeed

    cfg = check_config(config, optimizer)
    return deepspeed.initialize(model=model, optimizer=optimizer, config=cfg, **kwargs)


def _accelerate_deepspeed_plugin():
    """Accelerate's active DeepSpeed plugin, or None (never creates Accelerate state)."""
    if "accelerate" not in sys.modules:
        return None
    try:
        from accelerate.state import AcceleratorState
    except ImportError:  # pragma: no cover
        return None
    if not AcceleratorState._shared_state:  # no Accelerator yet: do not initialise one
        return None
    try:
        return AcceleratorState().deepspeed_plugin
    except (AttributeError, KeyError):  # a state without DeepSpeed, or not fully built yet
        return None


def check_accelerate(optimizer: Any = None) -> Optional[dict]:
    """Checks Accelerate's active DeepSpeed config (if an Accelerator uses DeepSpeed) for use
    with HTMuon; returns it, or None when Accelerate does not run DeepSpeed."""
    plugin = _accelerate_deepspeed_plugin()
    if plugin is None:
        return None
    steps = None
    try:
        from accelerate.state import GradientState

        if GradientState._shared_state:
            steps = GradientState().num_steps
    except (ImportError, AttributeError):  # an older Accelerate, or a state not built yet
        steps = None
    return check_config(plugin.deepspeed_config, optimizer, gradient_accumulation_steps=steps)


def guard_use_muon(origins: list) -> list:
    """Makes the first backward fail with a clear message if DeepSpeed tagged a parameter
    ``use_muon`` after HTMuon was built (an ``"optimizer": {"type": "Muon"}`` block next to
    HTMuon in a raw ``deepspeed.initialize``). DeepSpeed's ZeRO-1/2 reacts to that tag when
    the optimizer's class name contains "muon", as HTMuon's does, and would otherwise fail
    inside its own Newton-Schulz path or overwrite HTMuon's momentum. Installed only when
    deepspeed is imported; one attribute read per parameter per backward.

    Args:
        origins: HTMuon's ``(group, params, names)`` entries.

    Returns:
        the hook handles (``handle.remove()`` takes a guard off).
    """
    if "deepspeed" not in sys.modules:
        return []
    handles = []
    for _, params, names in origins:
        for p, name in zip(params, names):
            if not (isinstance(p, torch.Tensor) and p.requires_grad and p.is_leaf):
                continue

            def check(param: torch.Tensor, name: str = name) -> None:
                if getattr(param, "use_muon", False):
                    from ..distributed.backends.zero import check_not_tagged

                    check_not_tagged([param], [name])

            handles.append(p.register_post_accumulate_grad_hook(check))
    return handles


@register_build_guard
def deepspeed_build_guard(optimizer: Any) -> list:
    """HTMuon's build guard for DeepSpeed (:mod:`htmuon_dist.integrations`): Accelerate's
    DeepSpeed config checked now (:func:`check_accelerate`), and :func:`guard_use_muon` on the
    optimizer's original parameters. Returns the hook handles."""
    check_accelerate(optimizer)
    return guard_use_muon(optimizer.param_origins)
