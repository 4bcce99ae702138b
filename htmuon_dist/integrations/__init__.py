"""Integrations with training frameworks (DeepSpeed, Accelerate's DeepSpeed plugin)."""

from __future__ import annotations

from typing import Any


def install_guards(optimizer: Any) -> list:
    """Everything HTMuon checks about its surroundings when it is built, in one call.

    Under Accelerate's DeepSpeed plugin, refuses configs that would drop or bypass HTMuon
    (an optimizer block, optimizer offload, fp16 on CPU, an accumulation mismatch) before
    ``accelerator.prepare`` can act on them; with DeepSpeed imported, guards every parameter
    against DeepSpeed's ``use_muon`` tag. Returns the hook handles of the guards.
    """
    from .deepspeed import check_accelerate, guard_use_muon

    check_accelerate(optimizer)
    return guard_use_muon(optimizer._origins)
