"""HTMuon's arguments and param groups: the keys each kind of group takes, how a group without
``"htmuon"`` is split by dimension, and every check made at construction, each error naming
the parameter and the fix. Host-side only; no tensor values are read."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from . import functional as F
from .matrix_views import logical_shape, matrix_windows
from .spectral import check_power, get_method, validate_power

HTMUON_KEYS = (
    "lr", "power", "momentum", "nesterov", "weight_decay", "method", "rtol", "interval",
    "adjust_lr_fn", "normuon", "normuon_beta2", "stack_dims", "row_blocks",
)
ADAMW_KEYS = ("lr", "betas", "eps", "weight_decay")


def check_arguments(check_every: Any, nonfinite: Any, nonfinite_patience: Any, bucket_numel: Any,
                    comm_dtype: Any, keep_exchange_buffers: Any = False) -> None:
    """The constructor's optimizer-wide arguments (the per-group ones: :func:`validate_group`)."""
    if check_every is not None and not (isinstance(check_every, int) and check_every >= 1):
        raise ValueError(f"check_every must be a positive int or None, got {check_every!r}")
    if nonfinite not in ("raise", "skip"):
        raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
    if nonfinite_patience is not None and not (
        isinstance(nonfinite_patience, int) and nonfinite_patience >= 1
    ):
        raise ValueError(
            f"nonfinite_patience must be a positive int or None, got {nonfinite_patience!r}"
        )
    if bucket_numel is not None and not (isinstance(bucket_numel, int) and bucket_numel >= 1):
        raise ValueError(f"bucket_numel must be a positive int or None, got {bucket_numel!r}")
    if comm_dtype is not None and not (
        isinstance(comm_dtype, torch.dtype) and comm_dtype.is_floating_point
    ):
        raise ValueError(f"comm_dtype must be a floating torch.dtype or None, got {comm_dtype!r}")
    if not isinstance(keep_exchange_buffers, bool):
        raise ValueError(f"keep_exchange_buffers must be True or False, got {keep_exchange_buffers!r}")


def param_list(params: Any) -> list[torch.Tensor]:
    """A group's ``"params"`` as a list (a lone tensor is allowed, as torch allows it)."""
    return [params] if isinstance(params, torch.Tensor) else list(params)


def ndim(p: torch.Tensor) -> int:
    """Dimensions of the parameter's real shape (DeepSpeed ZeRO-3 partitions report 1-D)."""
    return len(logical_shape(p))


def split_group(group: dict) -> list[dict]:
    """A group without "htmuon" becomes an HTMuon group (its >= 2-D parameters, with the
    group's own keys) and an AdamW group (the rest, with the keys AdamW takes); a group with
    the key is returned as it is."""
    group = dict(group)
    params = param_list(group["params"])
    if "htmuon" in group:
        group["params"] = params
        return [group]
    names = group.pop("param_names", None)
    out = []
    for is_matrix in (True, False):
        chosen = [i for i, p in enumerate(params) if (ndim(p) >= 2) == is_matrix]
        if not chosen:
            continue
        if is_matrix:  # the group's own keys are HTMuon's; adamw_* keys go to the other half
            sub = {k: v for k, v in group.items() if not k.startswith("adamw_")}
        else:
            sub = {k: v for k, v in group.items() if k not in HTMUON_KEYS}
        sub.update(params=[params[i] for i in chosen], htmuon=is_matrix)
        if names is not None:
            sub["param_names"] = [names[i] for i in chosen]
        out.append(sub)
    return out


def fill_defaults(group: dict, htmuon_defaults: dict, adamw_defaults: dict) -> dict:
    """A copy of a group with "htmuon" set, its defaults filled in; in an AdamW group
    ``"adamw_lr"`` (etc.) means its ``"lr"``."""
    group = dict(group)
    if group["htmuon"]:
        defaults = htmuon_defaults
    else:
        defaults = adamw_defaults
        for key in ADAMW_KEYS:
            if f"adamw_{key}" in group:
                group[key] = group.pop(f"adamw_{key}")
    for key, value in defaults.items():
        group.setdefault(key, value)
    return group


def validate_group(group: dict) -> None:
    """Refuses a filled group whose devices, lr, dtypes or HTMuon/AdamW settings are wrong."""
    params = param_list(group["params"])
    devices = {p.device for p in params}
    if len(devices) > 1:
        raise ValueError(
            f"a param group mixes devices {sorted(map(str, devices))}; move the model to one "
            f"device before building the optimizer (or use one group per device)"
        )
    name = "lr" if group["htmuon"] else "adamw_lr"
    lr = group["lr"]
    if isinstance(lr, torch.Tensor) and lr.numel() == 1 and not lr.requires_grad:
        pass  # a tensor lr (LR schedulers with capturable optimizers) is a number too
    elif isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise ValueError(f"{name} must be a number, got {type(lr).__name__} {lr!r}")
    if not 0.0 <= float(lr):
        raise ValueError(f"{name} must be >= 0, got {lr}")
    names = group.get("param_names") or [f"params[{j}]" for j in range(len(params))]
    for p, pname in zip(params, names):
        if p.is_complex():
            raise ValueError(
                f"{pname}: HTMuon does not support complex parameters ({p.dtype}); use real "
                f"tensors (e.g. torch.view_as_real) or another optimizer for this one"
            )
    if group["htmuon"]:
        _validate_htmuon(group)
    else:
        beta1, beta2 = group["betas"]
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ValueError(f"adamw_betas must be in [0, 1), got {group['betas']}")
        if not group["eps"] > 0.0:
            raise ValueError(f"adamw_eps must be > 0, got {group['eps']}")


def _validate_htmuon(group: dict) -> None:
    group["power"] = validate_power(group["power"])
    method = get_method(group["method"])
    if method.powers == "zero" and group["power"] != 0.0:
        raise ValueError(
            f"method={group['method']!r} computes Muon's polar factor only; it needs "
            f"power=0 (got {group['power']}), or choose an HTMuon method"
        )
    if not 0.0 <= group["momentum"] < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {group['momentum']}")
    if group["interval"] is not None and (
        not isinstance(group["interval"], int) or group["interval"] < 1
    ):
        raise ValueError(f"interval must be a positive int or None, got {group['interval']!r}")
    if group["adjust_lr_fn"] not in F.ADJUST_LR_FNS:
        raise ValueError(
            f"adjust_lr_fn must be one of {F.ADJUST_LR_FNS}, got {group['adjust_lr_fn']!r}"
        )
    check_power(group["method"], group["power"])
    if not isinstance(group["normuon"], bool):
        raise ValueError(
            f"normuon must be True or False (NorMuon's per-row normalisation), got "
            f"{group['normuon']!r}"
        )
    beta2 = group["normuon_beta2"]
    if isinstance(beta2, bool) or not isinstance(beta2, (int, float)) or not 0.0 <= beta2 < 1.0:
        raise ValueError(
            f"normuon_beta2 must be a number in [0, 1) (the reference uses 0.95), got {beta2!r}"
        )


def check_windows(group: dict, params: Sequence[torch.Tensor], names: Sequence[str]) -> None:
    """Normalises an HTMuon group's ``row_blocks`` to a tuple and refuses bad ``stack_dims`` /
    ``row_blocks`` now (FSDP1 flattens parameters to 1-D: those are checked at the first step)."""
    if group["row_blocks"] is not None:
        group["row_blocks"] = tuple(int(b) for b in group["row_blocks"])
    for p, name in zip(params, names):
        shape = logical_shape(p)
        if len(shape) >= 2:
            matrix_windows(shape, group["stack_dims"], group["row_blocks"], name)


def check_dense(matrix_grads: Sequence[tuple[str, Optional[torch.Tensor]]]) -> None:
    """Refuses sparse gradients before anything is touched, naming the parameter."""
    for name, grad in matrix_grads:
        if grad is not None and grad.is_sparse:
            raise ValueError(
                f"{name}: HTMuon got a sparse gradient (nn.Embedding(sparse=True)?); it needs "
                f"dense gradients: use sparse=False"
            )
