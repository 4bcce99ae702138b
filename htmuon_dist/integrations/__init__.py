"""Integrations with training frameworks (DeepSpeed, Accelerate's DeepSpeed plugin).

The guards HTMuon needs against its surroundings are applied here, not in the optimizer: each
integration module registers a *build guard* (:func:`register_build_guard`), a function of a
newly built optimizer that checks whatever framework it is about (and only when that framework
is in use) and returns hook handles. ``HTMuon`` calls :func:`apply_build_guards` once, at the
end of its constructor, without knowing which frameworks exist; they run then because
``deepspeed.initialize`` and ``Accelerator.prepare`` act on the optimizer right after.
"""

from __future__ import annotations

from typing import Any, Callable

BuildGuard = Callable[[Any], list]
_BUILD_GUARDS: list[BuildGuard] = []


def register_build_guard(guard: BuildGuard) -> BuildGuard:
    """Adds ``guard(optimizer) -> hook handles`` to the guards every new HTMuon gets."""
    if guard not in _BUILD_GUARDS:
        _BUILD_GUARDS.append(guard)
    return guard


def apply_build_guards(optimizer: Any) -> list:
    """Runs every registered build guard on ``optimizer``; returns their hook handles.

    Registered by :mod:`.deepspeed`: under Accelerate's DeepSpeed plugin, refuses configs that
    would drop or bypass HTMuon (an optimizer block, optimizer offload, fp16 on CPU, an
    accumulation mismatch) before ``accelerator.prepare`` can act on them; with DeepSpeed
    imported, guards every parameter against DeepSpeed's ``use_muon`` tag.
    """
    handles: list = []
    for guard in _BUILD_GUARDS:
        handles.extend(guard(optimizer))
    return handles


install_guards = apply_build_guards  # the name before the build-guard registry

from . import deepspeed as _deepspeed  # noqa: E402,F401  (registers its guards)
