"""Which parameters are HTMuon's "hidden matrices", and how each splits into independent
matrices (expert stacks, fused projections): both conventions, Hugging Face aware.

What :func:`param_groups` recognises (transformers 5; layouts read from its modeling code):

| family | parameter | layout | HTMuon matrices |
|---|---|---|---|
| Mixtral, Qwen3-MoE | ``mlp.experts.gate_up_proj`` | (E, 2I, H), rows [gate; up] | per expert, gate and up apart: (I, H) x 2E |
| Mixtral, Qwen3-MoE | ``mlp.experts.down_proj`` | (E, H, I) | per expert (H, I) |
| GPT-OSS | ``mlp.experts.gate_up_proj`` | (E, H, 2I), gate/up interleaved in columns | per expert (H, 2I), gate with up (columns are not row blocks) |
| Llama 4 | ``feed_forward.experts.gate_up_proj`` | (E, H, 2I), [gate, up] in columns | per expert (H, 2I), gate with up |
| GPT-OSS, Llama 4 | ``experts.down_proj`` | (E, I, H) | per expert (I, H) |
| all MoE | router (``mlp.gate``, ``router``) | (E, H) | ``router=``: "adamw" (default) or "htmuon" |
| GPT-OSS | ``*_bias`` (E, ·), ``sinks`` | biases | AdamW |
| Phi-3 | ``qkv_proj`` | rows [q; k; v] | q, k, v apart (``split_heads``: per head) |
| Phi-3 | ``mlp.gate_up_proj`` | rows [gate; up] | gate, up apart |
| GPT-NeoX | ``query_key_value`` | rows per head [q_h; k_h; v_h] | per head and projection (head_size rows each) |
| Falcon | ``query_key_value`` | multi-query [q...; k; v], else head-interleaved | q, k, v apart (multi-query), else per head and projection |
| any | ``nn.Conv*`` weights | (out, in, k...) | one (out, in·k...) matrix (``stack_dims=0``) |

The split is carried by two group keys, ``"stack_dims"`` and ``"row_blocks"``
(:mod:`htmuon_dist.matrix_views`); parameters with different splits go to different HTMuon
groups that share every other option.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from .matrix_views import auto_stack_dims, head_blocks, logical_shape

CONVENTIONS = ("muon", "reference")
ROUTER_CHOICES = ("adamw", "htmuon")
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


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


def _is_router(name: str, module: nn.Module) -> bool:
    cls = type(module).__name__
    return "Router" in cls or (name.endswith("mlp.gate") and hasattr(module, "num_experts"))


def _config_heads(model: nn.Module) -> Optional[tuple[int, int, int]]:
    """(query heads, key/value heads, head dim) from a transformers config, or None."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if not heads or not hidden:
        return None
    kv = getattr(config, "num_key_value_heads", None) or getattr(config, "num_kv_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return int(heads), int(kv), int(head_dim)


def _split_of(model: nn.Module, name: str, module: nn.Module, pname: str, shape: tuple,
              split_fused: bool, split_heads: bool) -> tuple[Optional[int], Optional[tuple[int, ...]]]:
    """(stack_dims, row_blocks) for parameter ``pname`` of ``module`` (named ``name``)."""
    if isinstance(module, _CONV):
        return 0, None
    stack = auto_stack_dims(shape) if len(shape) == 3 else None
    rows = int(shape[1] if len(shape) == 3 else shape[0])
    leaf = name.split(".")[-1]
    heads = _config_heads(model)
    if len(shape) == 3 and type(module).__name__.endswith("Experts") and pname == "gate_up_proj":
        inter = next((getattr(module, a) for a in ("intermediate_dim", "intermediate_size", "expert_dim")
                      if isinstance(getattr(module, a, None), int)), None)
        if split_fused and inter is not None and rows == 2 * inter:  # (E, 2I, H): rows [gate; up]
            return stack, (inter, inter)
        return stack, None  # (E, H, 2I): gate/up are columns (GPT-OSS interleaved, Llama 4 halves)
    if len(shape) != 2 or pname != "weight" or heads is None:
        return stack, None
    q, kv, hd = heads
    config = getattr(model, "config", None)
    if leaf == "qkv_proj" and rows == (q + 2 * kv) * hd and split_fused:  # Phi-3: [q; k; v]
        return None, head_blocks(rows, hd) if split_heads else (q * hd, kv * hd, kv * hd)
    if leaf == "query_key_value" and split_fused:
        if getattr(config, "multi_query", False) and not getattr(config, "new_decoder_architecture", False) \
                and rows == (q + 2) * hd:  # Falcon multi-query: [q heads; k; v]
            return None, head_blocks(rows, hd) if split_heads else (q * hd, hd, hd)
        if rows % hd == 0:  # NeoX / Falcon: heads interleaved, so q (or k, v) is not contiguous
            return None, head_blocks(rows, hd)
    if leaf == "gate_up_proj" and split_fused and rows % 2 == 0:  # Phi-3 MLP: [gate; up]
        return None, (rows // 2, rows // 2)
    if split_heads and leaf in ("q_proj", "k_proj", "v_proj") and rows % hd == 0:
        return None, head_blocks(rows, hd)
    return None, None


def param_groups(
    model: nn.Module,
    convention: str = "muon",
    matrix_options: Optional[dict[str, Any]] = None,
    adamw_options: Optional[dict[str, Any]] = None,
    split_fused: bool = True,
    split_heads: bool = False,
    router: str = "adamw",
) -> list[dict[str, Any]]:
    """Param groups for :class:`htmuon_dist.HTMuon` with names, for a (Hugging Face) model.

    Args:
        model: any module; LLaMA-style models are recognised by their ``nn.Embedding`` layers
            and ``get_output_embeddings()`` / an ``lm_head`` module; MoE and fused layouts as
            in the module docstring.
        convention: "muon" (Muon's usual split: hidden >= 2-D weights to HTMuon; embeddings,
            the LM head, norms and biases to AdamW) or "reference" (the HTMuon reference: every
            >= 2-D weight, embeddings and head included, to HTMuon; only 1-D to AdamW).
        matrix_options: extra keys for the HTMuon groups (e.g. ``{"lr": 0.03}``).
        adamw_options: extra keys for the AdamW group (e.g. ``{"lr": 1e-3, "weight_decay": 0}``).
        split_fused: fused projections (QKV, gate/up, MoE gate_up) as independent row blocks.
        split_heads: attention projections (q/k/v, fused QKV) as one matrix per head.
        router: where MoE routers (E x H) go: "adamw" (default; "htmuon" measured no better on
            the tiny Mixtral, docs/distributed.md "Expert stacks and fused projections") or "htmuon".

    Returns:
        HTMuon groups (``"htmuon": True``, one per distinct ``stack_dims``/``row_blocks``) then
        the AdamW group, each with ``"params"`` and ``"param_names"``; empty groups left out.
        Tied weights appear once.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    if router not in ROUTER_CHOICES:
        raise ValueError(f"router must be one of {ROUTER_CHOICES}, got {router!r}")
    excluded = _head_and_embedding_ids(model) if convention == "muon" else set()
    seen: set[int] = set()
    matrix: dict[tuple, list] = {}
    other: list = []
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            name = f"{mname}.{pname}" if mname else pname
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            shape = logical_shape(p)
            is_bias = pname == "bias" or pname.endswith("_bias")
            to_adamw = (len(shape) < 2 or id(p) in excluded or is_bias
                        or (router == "adamw" and _is_router(mname, module)))
            if to_adamw:
                other.append((name, p))
                continue
            key = _split_of(model, mname, module, pname, shape, split_fused, split_heads)
            matrix.setdefault(key, []).append((name, p))
    order = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    groups = []
    for (stack_dims, row_blocks), members in sorted(matrix.items(), key=lambda kv: order.get(kv[1][0][0], 0)):
        group: dict[str, Any] = {"params": [p for _, p in members], "param_names": [n for n, _ in members],
                                 "htmuon": True}
        if stack_dims is not None:
            group["stack_dims"] = stack_dims
        if row_blocks is not None:
            group["row_blocks"] = row_blocks
        group.update(matrix_options or {})
        groups.append(group)
    if other:
        other.sort(key=lambda np_: order.get(np_[0], 0))
        group = {"params": [p for _, p in other], "param_names": [n for n, _ in other], "htmuon": False}
        group.update(adamw_options or {})
        groups.append(group)
    return groups
