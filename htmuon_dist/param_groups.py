"""Which parameters are HTMuon's "hidden matrices": both conventions, Hugging Face aware."""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

CONVENTIONS = ("muon", "reference")


def _head_and_embedding_ids(model: nn.Module) -> set[int]:
    ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is not None and getattr(head, "weight", None) is not None:
        ids.add(id(head.weight))
    for name, module in model.named_modules():
        if name.split(".")[-1] in ("lm_head", "output", "head") and getattr(module, "weight", None) is not None:
            ids.add(id(module.weight))
    return ids


def param_groups(
    model: nn.Module,
    convention: str = "muon",
    matrix_options: Optional[dict[str, Any]] = None,
    adamw_options: Optional[dict[str, Any]] = None,
) -> list[dict[str, Any]]:
    """Param groups for :class:`htmuon_dist.HTMuon` with names, for a (Hugging Face) model.

    Args:
        model: any module; LLaMA-style models are recognised by their ``nn.Embedding`` layers
            and ``get_output_embeddings()`` / an ``lm_head`` module.
        convention: "muon" (Muon's usual split: hidden >= 2-D weights to HTMuon; embeddings,
            the LM head, norms and biases to AdamW) or "reference" (the HTMuon reference: every
            >= 2-D weight, embeddings and head included, to HTMuon; only 1-D to AdamW).
        matrix_options: extra keys for the HTMuon group (e.g. ``{"lr": 0.03}``).
        adamw_options: extra keys for the AdamW group (e.g. ``{"lr": 1e-3, "weight_decay": 0}``).

    Returns:
        ``[{"params", "param_names", "htmuon": True, ...}, {..., "htmuon": False, ...}]``,
        empty groups left out. Tied weights appear once.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    excluded = _head_and_embedding_ids(model) if convention == "muon" else set()
    seen: set[int] = set()
    matrix: list = []
    other: list = []
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        # ds_shape: under DeepSpeed zero.Init a partitioned parameter reports a 1-D shape.
        ndim = len(getattr(p, "ds_shape", None) or p.shape)
        target = matrix if ndim >= 2 and id(p) not in excluded else other
        target.append((name, p))
    groups = []
    for members, flag, options in ((matrix, True, matrix_options), (other, False, adamw_options)):
        if members:
            group = {"params": [p for _, p in members], "param_names": [n for n, _ in members],
                     "htmuon": flag}
            group.update(options or {})
            groups.append(group)
    return groups
