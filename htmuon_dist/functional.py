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
    keep: Optional[torch.Tensor] = None,
) -> None:
    """``W <- W·(1 - lr·wd) - lr·scale·O`` in place, per (W, O) pair.

    ``updates`` may be in a lower precision than ``params`` (bf16 from the wire); the update
    is added in the parameter's precision. With ``keep`` (a 0-d device tensor, 1.0 or 0.0),
    the decay is ``1 - lr·wd·keep``: a skipped step (keep 0, updates already zeroed) leaves W
    exactly as it was, without reading ``keep`` on the host.
    """
    by_decay: dict[tuple[float, torch.dtype], list[torch.Tensor]] = {}
    for p, lr, wd in zip(params, lrs, weight_decays):
        if lr * wd != 0.0:
            by_decay.setdefault((lr * wd, p.dtype), []).append(p)
    for (rate, dtype), group in by_decay.items():
        if keep is None:
            torch._foreach_mul_(group, 1.0 - rate)
        else:
            torch._foreach_mul_(group, (1.0 - rate * keep).to(dtype))
    for p, u, lr, scale in zip(params, updates, lrs, scales):
        p.add_(u, alpha=-lr * scale)


def adamw_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor],
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    keep: torch.Tensor,
    fused: Optional[bool] = None,
) -> None:
    """Bias-corrected AdamW with decoupled weight decay, in place, gated on the device.

    ``steps`` are 0-d float32 tensors (one per parameter, 1-based, already including this
    step); ``keep`` is a 0-d float32 tensor, 1.0 to step or 0.0 to leave every tensor exactly
    as it is (a skipped non-finite step), never read on the host.

    ``fused`` (None: where torch has it for these tensors) runs torch's fused AdamW kernel, one
    pass over all tensors with no temporaries, skipped by its ``found_inf = 1 - keep``
    (GradScaler's gate; on CUDA read by the kernel on the device). Otherwise a ``_foreach``
    composition, in chunks of at most the largest tensor (two temporaries of that size at
    once); it needs finite ``grads`` for a gated write to be exact, so it zeroes their
    non-finite entries in place first.
    """
    if not params:
        return
    params, grads, m, v = list(params), list(grads), list(exp_avgs), list(exp_avg_sqs)
    if fused is None:
        fused = fused_adamw_supported(params + grads + m + v, list(steps))
    if fused:
        found_inf = (1.0 - keep).to(device=params[0].device, dtype=torch.float32)
        if isinstance(lr, torch.Tensor):
            lr = lr.to(params[0].device)
        torch._fused_adamw_(
            params, grads, m, v, [], list(steps), lr=lr, beta1=betas[0], beta2=betas[1],
            weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False,
            grad_scale=None, found_inf=found_inf,
        )
        return
    for g in grads:
        torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
    largest = max(p.numel() for p in params)
    start = 0
    for chunk in _chunks([p.numel() for p in params], largest):
        part = slice(start, start + chunk)
        start += chunk
        _foreach_adamw(params[part], grads[part], m[part], v[part], list(steps)[part], lr, betas,
                       eps, weight_decay, keep)


def fused_adamw_supported(tensors: Sequence[torch.Tensor], steps: Sequence[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW kernel takes these tensors (parameters, gradients, moments)
    and step counters: one floating dtype and one device of a type torch lists for its fused
    kernels, float32 counters on that device."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    first = tensors[0]
    return (
        first.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
        and first.device.type in _get_fused_kernels_supported_devices()
        and all(t.dtype == first.dtype and t.device == first.device for t in tensors)
        and all(s.dtype == torch.float32 and s.device == first.device for s in steps)
    )


def _chunks(numels: Sequence[int], limit: int) -> list[int]:
    """Lengths of consecutive runs of tensors with at most ``limit`` elements together (at
    least one tensor each)."""
    out: list[int] = []
    size = 0
    for n in numels:
        if not out or size + n > limit:
            out.append(0)
            size = 0
        out[-1] += 1
        size += n
    return out


def _foreach_adamw(params: list[torch.Tensor], grads: list[torch.Tensor], m: list[torch.Tensor],
                   v: list[torch.Tensor], steps: list[torch.Tensor], lr: float,
                   betas: tuple[float, float], eps: float, weight_decay: float,
                   keep: torch.Tensor) -> None:
    """:func:`adamw_` without the fused kernel, for one chunk (finite ``grads``)."""
    beta1, beta2 = betas
    dtype = m[0].dtype
    # m <- m + (1 - b1)·keep·(g - m),  v <- v + (1 - b2)·keep·(g² - v)
    diff = torch._foreach_sub(grads, m)
    torch._foreach_mul_(diff, (keep * (1.0 - beta1)).to(dtype))
    torch._foreach_add_(m, diff)
    del diff
    sq = torch._foreach_mul(grads, grads)
    torch._foreach_sub_(sq, v)
    torch._foreach_mul_(sq, (keep * (1.0 - beta2)).to(dtype))
    torch._foreach_add_(v, sq)
    del sq
    if weight_decay:
        torch._foreach_mul_(params, (1.0 - lr * weight_decay * keep).to(params[0].dtype))
    # the bias corrections from the device step counts (at least 1, so a skipped first step
    # divides by nothing smaller than 1 - beta)
    t = torch._foreach_maximum(list(steps), 1.0)
    bc1 = torch._foreach_pow(beta1, t)  # beta1 ** t
    bc2 = torch._foreach_pow(beta2, t)
    torch._foreach_neg_(bc1)
    torch._foreach_add_(bc1, 1.0)  # 1 - beta1 ** t
    torch._foreach_neg_(bc2)
    torch._foreach_add_(bc2, 1.0)
    torch._foreach_sqrt_(bc2)
    denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, bc2)
    torch._foreach_add_(denom, eps)
    if not lr:
        return
    # p <- p - lr·keep·m / ((1 - b1^t)·denom): the step size folded into the denominator,
    # denom·(1 - b1^t) / (-lr·keep), which is -inf when keep is 0, so m / it adds exactly 0
    torch._foreach_div_(bc1, keep * -lr)
    torch._foreach_mul_(denom, bc1)
    torch._foreach_addcdiv_(params, m, denom)
