"""HTMuon's and AdamW's elementwise arithmetic as pure functions over lists of tensors.

No state, no communication, no rank logic: :class:`htmuon_dist.HTMuon` owns the state and
:class:`htmuon_dist.distributed.engine.ExchangeEngine` decides which rank calls what on which
piece. Every function takes plain local tensors (a DTensor's local shard, a flat view of a
DeepSpeed partition) of any shape; lists go through ``torch._foreach_*`` kernels where torch
has them, so a bucket of pieces costs a few kernel launches rather than one per tensor.

For one hidden matrix W (m, n) with gradient G, step t (``matrix_step`` below spells it out):
    B <- lerp(B, G, 1 - beta)                       momentum_
    M  = lerp(G, B, beta)  (Nesterov) or B          nesterov_into
    O  = U Σ^p V^T  for  M = U Σ V^T                htmuon_dist.spectral (on the owner rank)
    W <- W (1 - lr·wd) - lr · scale(m, n) · O       decay_and_update_
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

ADJUST_LR_FNS = (None, "original", "match_rms_adamw")


def momentum_(bufs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], beta: float) -> None:
    """``B <- beta·B + (1 - beta)·G`` in place, for every pair (same shapes, any dtype)."""
    if bufs:
        torch._foreach_lerp_(list(bufs), list(grads), 1.0 - beta)


def nesterov_into(out: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor, beta: float,
                  nesterov: bool) -> torch.Tensor:
    """Writes the matrix HTMuon transforms into ``out`` and returns it.

    ``out`` may have a lower precision than ``grad``/``buf`` (the exchange's wire dtype): the
    blend is computed in the inputs' precision and rounded once when stored.
    """
    if nesterov:
        return torch.lerp(grad, buf, beta, out=out)
    return out.copy_(buf)


def muon_scale(rows: int, cols: int, adjust_lr_fn: Optional[str] = None) -> float:
    """The factor multiplying lr for an (rows, cols) matrix.

    ``None`` or ``"original"``: Muon's ``max(1, rows/cols)^0.5`` (the reference's). With
    ``"match_rms_adamw"``: ``0.2·sqrt(max(rows, cols))``, as torch.optim.Muon, which gives the
    update the RMS of a typical AdamW update so that an AdamW learning rate carries over.
    """
    if adjust_lr_fn in (None, "original"):
        return max(1.0, rows / cols) ** 0.5 if cols else 1.0
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(
        f"adjust_lr_fn must be one of {ADJUST_LR_FNS}, got {adjust_lr_fn!r}"
    )


def decay_and_update_(
    params: Sequence[torch.Tensor],
    updates: Sequence[torch.Tensor],
    lrs: Sequence[float],
    weight_decays: Sequence[float],
    scales: Sequence[float],
) -> None:
    """``W <- W·(1 - lr·wd) - lr·scale·O`` in place, per (W, O) pair.

    ``updates`` may be in a lower precision than ``params`` (bf16 from the wire); the update
    is added in the parameter's precision.
    """
    decays = [1.0 - lr * wd for lr, wd in zip(lrs, weight_decays)]
    decayed = [(p, d) for p, d in zip(params, decays) if d != 1.0]
    if decayed:
        torch._foreach_mul_([p for p, _ in decayed], [d for _, d in decayed])
    for p, u, lr, scale in zip(params, updates, lrs, scales):
        p.add_(u, alpha=-lr * scale)


def adamw_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    steps: Sequence[int],
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """Bias-corrected AdamW with decoupled weight decay, in place; ``steps`` are 1-based and
    already include this step (one per tensor: a parameter without gradients does not step)."""
    if not params:
        return
    params, grads, m, v = list(params), list(grads), list(exp_avgs), list(exp_avg_sqs)
    beta1, beta2 = betas
    torch._foreach_lerp_(m, grads, 1.0 - beta1)
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, grads, grads, value=1.0 - beta2)
    if weight_decay:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    denom = torch._foreach_div(v, [1.0 - beta2**t for t in steps])
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, m, denom, [-lr / (1.0 - beta1**t) for t in steps])
