"""The four optimizers under identical conditions, and the LR schedule."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .config import TrainArguments

_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "module.", "_orig_mod.")


def clean_name(name: str) -> str:
    """The parameter's name in the unwrapped model (FSDP1/DDP/compile add prefixes)."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def matrix_names(model: nn.Module, convention: str, router: str = "adamw") -> set[str]:
    """Names routed to HTMuon/Muon, decided on the unwrapped model (FSDP1 flattens parameters to
    1-D views afterwards, so shapes cannot be read from the wrapped one)."""
    from htmuon_dist import param_groups

    return {clean_name(n) for g in param_groups(model, convention=convention, router=router)
            if g["htmuon"] for n in g["param_names"]}


def matrix_splits(model: nn.Module, convention: str, router: str = "adamw") -> dict[str, dict]:
    """Per routed name, the group keys that cut it into independent matrices (``stack_dims``,
    ``row_blocks``: MoE experts per expert and gate apart from up); decided on the unwrapped model."""
    from htmuon_dist import param_groups

    return {clean_name(n): {k: g[k] for k in ("stack_dims", "row_blocks") if k in g}
            for g in param_groups(model, convention=convention, router=router) if g["htmuon"] for n in g["param_names"]}


def matrix_shape_counts(model: nn.Module, matrices: set[str],
                        splits: "dict[str, dict] | None" = None) -> dict[tuple[int, int], int]:
    """(rows, cols) -> how many independent matrices of that shape HTMuon orthogonalises: every
    routed parameter cut by its ``splits`` keys (expert stacks per expert, fused projections
    per block). Read on the unwrapped model (a ZeRO-3 partitioned parameter by its ``ds_shape``)."""
    from htmuon_dist.matrix_views import logical_shape, matrix_windows

    splits = splits or {}
    counts: dict[tuple[int, int], int] = {}
    for raw, p in model.named_parameters():
        name = clean_name(raw)
        if name not in matrices:
            continue
        keys = splits.get(name, {})
        for w in matrix_windows(logical_shape(p), keys.get("stack_dims"), keys.get("row_blocks"), name):
            counts[(w.rows, w.cols)] = counts.get((w.rows, w.cols), 0) + 1
    return counts


def build_optimizer(model: nn.Module, t: TrainArguments, matrices: set[str],
                    splits: "dict[str, dict] | None" = None) -> torch.optim.Optimizer:
    """The HTMuon family (htmuon, htmuon_interval, htmuon_stream, htmuon_ns, htmuon_ht, muon, normuon,
    htnormuon, htnormuon_interval): :class:`htmuon_dist.HTMuon` on ``matrices`` (kwargs from
    :func:`htmuon_kwargs`) and its AdamW (betas 0.9/0.95, eps 1e-10 as the reference, weight
    decay ``--adamw_weight_decay``) on the rest.
    ``adamw``: torch AdamW, betas 0.9/0.95, weight decay on the same matrices only.
    """
    named = [(clean_name(n), p) for n, p in model.named_parameters() if p.requires_grad]
    unknown = matrices - {n for n, _ in named}
    if unknown:
        raise RuntimeError(f"parameters {sorted(unknown)[:3]} were routed but are not in the model")
    mat = [(n, p) for n, p in named if n in matrices]
    rest = [(n, p) for n, p in named if n not in matrices]
    if t.optimizer == "adamw":
        return torch.optim.AdamW(
            [{"params": [p for _, p in mat], "weight_decay": t.weight_decay},
             {"params": [p for _, p in rest], "weight_decay": 0.0}],
            lr=t.lr, betas=(0.9, 0.95), eps=1e-8,
        )
    from htmuon_dist import HTMuon

    by_split: dict[str, list] = {}
    for n, p in mat:  # one HTMuon group per distinct split (experts, fused blocks), same options
        by_split.setdefault(repr(sorted((splits or {}).get(n, {}).items())), []).append((n, p))
    groups = []
    for members in by_split.values():
        extra = (splits or {}).get(members[0][0], {})
        groups.append({"params": [p for _, p in members], "param_names": [n for n, _ in members],
                       "htmuon": True, **extra})
    if rest:
        groups.append({"params": [p for _, p in rest], "param_names": [n for n, _ in rest], "htmuon": False})
    return HTMuon(groups, **htmuon_kwargs(t))


# --optimizer -> (NorMuon row normalisation on?, interval steps on?); the spectral method and
# power come from resolve() (htmuon_stream -> stream, htmuon_ns -> ns_roots, htmuon_ht -> ht,
# muon/normuon -> p 0, ns5).
_HTMUON_FAMILY = {
    "htmuon": (False, False),
    "htmuon_interval": (False, True),
    "htmuon_stream": (False, False),
    "htmuon_ns": (False, False),
    "htmuon_ht": (False, False),
    "muon": (False, False),
    "normuon": (True, False),
    "htnormuon": (True, False),
    "htnormuon_interval": (True, True),
}


# --comm_dtype -> HTMuon's comm_dtype (None: the momentum's own dtype)
COMM_DTYPES: dict[str, Optional[torch.dtype]] = {"none": None, "bf16": torch.bfloat16, "fp32": torch.float32}


def htmuon_kwargs(t: TrainArguments) -> dict:
    """Keyword arguments of :class:`htmuon_dist.HTMuon` for a resolved ``t`` (pure function).

    ``normuon``/``normuon_beta2`` are passed only for the NorMuon family and ``adjust_lr_fn``
    only when set, so the plain optimizers need nothing the HTMuon class may not have.
    """
    if t.optimizer not in _HTMUON_FAMILY:
        raise ValueError(f"--optimizer {t.optimizer!r} does not use HTMuon; choose one of {sorted(_HTMUON_FAMILY)}")
    normuon, interval = _HTMUON_FAMILY[t.optimizer]
    kwargs: dict = dict(
        lr=t.lr, power=t.power, momentum=t.momentum, nesterov=True, weight_decay=t.weight_decay,
        method=t.spectral_method, interval=t.interval if interval else None,
        adamw_lr=t.adamw_lr, adamw_betas=(0.9, 0.95), adamw_eps=1e-10,
        adamw_weight_decay=t.adamw_weight_decay,
        nonfinite=t.nonfinite, nonfinite_patience=t.nonfinite_patience,
        # HTMuon's rank-agreement and non-finite check (a collective and a host read) runs at
        # the loop's logging interval, where the loop reads skipped_steps anyway: steps between
        # logging steps stay free of host syncs, and a raise or the patience stops the run at
        # the next logging step
        check_every=max(1, int(t.logging_steps)),
        comm_dtype=COMM_DTYPES[t.comm_dtype],
    )
    if normuon:
        kwargs.update(normuon=True, normuon_beta2=t.normuon_beta2)
    if t.adjust_lr_fn is not None:
        kwargs["adjust_lr_fn"] = t.adjust_lr_fn
    return kwargs


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Multiplier of the peak lr at scheduler step s (0-based; step s is the (s+1)-th update):
    linear warmup from 1/warmup to 1 over ``warmup`` updates, then cosine to ``min_ratio`` at
    the last update."""

    def f(s: int) -> float:
        if warmup > 0 and s < warmup:
            return (s + 1) / warmup
        decay = max(1, total - warmup - 1)
        progress = min(1.0, (s - warmup) / decay)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def build_scheduler(optimizer: torch.optim.Optimizer, t: TrainArguments) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t.warmup_steps, t.max_steps, t.min_lr_ratio))
