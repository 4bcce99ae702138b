"""ESD statistics of every hidden matrix during training (``htmuon-train --esd_steps N``).

Distributed like the update: each matrix is gathered onto its owner in the optimizer's exchange
plan (:func:`htmuon_dist.distributed.owned_map.map_owned`), the owner computes
:func:`spectral_stats` of the matrices it owns, and only the small per-matrix results are
all-gathered. For AdamW (no HTMuon engine) an engine with the same planner is built once from
the model's parameters, so the work is spread over the ranks the same way.
"""

from __future__ import annotations

import math
import time
from typing import Any, Optional, Sequence

import torch

from .esd import spectral_stats

_TYPES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate",
          "up_proj": "up", "down_proj": "down", "embed_tokens": "embed", "lm_head": "lm_head"}


def matrix_type(name: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``q`` (LLaMA names; else the module's name)."""
    parts = name.split(".")
    base = parts[-2] if parts[-1] in ("weight", "bias") and len(parts) > 1 else parts[-1]
    return _TYPES.get(base, base)


def short_name(name: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``layers.3.self_attn.q_proj``."""
    if name.endswith(".weight"):
        name = name[: -len(".weight")]
    return name[len("model."):] if name.startswith("model.") else name


def is_hidden(name: str) -> bool:
    """A matrix inside a transformer block (not the embedding or the LM head)."""
    return ".layers." in f".{name}"


def _finite(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def stats_row(step: int, names: Sequence[str], stats: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """One metrics row: ``esd/<matrix>/<stat>`` per matrix, ``esd_alpha/<type>`` (mean over the
    layers) and ``esd_alpha_mean`` (mean over the hidden matrices). NaN becomes None (JSON)."""
    row: dict[str, Any] = {"step": step}
    by_type: dict[str, list[float]] = {}
    hidden: list[float] = []
    for i, name in enumerate(names):
        st = stats.get(i)
        if st is None:
            continue
        for key, value in st.items():
            row[f"esd/{short_name(name)}/{key}"] = _finite(value)
        a = st["alpha"]
        if math.isfinite(a):
            by_type.setdefault(matrix_type(name), []).append(a)
            if is_hidden(name):
                hidden.append(a)
    for kind, values in by_type.items():
        row[f"esd_alpha/{kind}"] = sum(values) / len(values)
    if hidden:
        row["esd_alpha_mean"] = sum(hidden) / len(hidden)
    return row


class EsdMonitor:
    """Computes the ESD row of the current weights; collective (call on every rank).

    Args:
        optimizer: the training optimizer (HTMuon, possibly wrapped by Accelerate, or any other).
        model: the (possibly sharded) model, used when the optimizer has no HTMuon engine.
        matrix_names: clean names of the matrices to analyse when there is no HTMuon engine.
        clean: maps a wrapped parameter name to its clean name (FSDP/DDP prefixes).
    """

    def __init__(self, optimizer, model: torch.nn.Module, matrix_names: set[str], clean=lambda n: n) -> None:
        self.optimizer = getattr(optimizer, "optimizer", optimizer)
        self.model = model
        self.matrix_names = matrix_names
        self.clean = clean
        self._own: Optional[tuple[Any, list[str], list[torch.Tensor], list[Any]]] = None

    def _engine_and_pieces(self) -> tuple[Any, list[str], list[torch.Tensor]]:
        from ..distributed.owned_map import optimizer_pieces

        opt = self.optimizer
        if getattr(opt, "engine", None) is not None:
            if "zero" in str(getattr(opt, "backend", "")):
                raise RuntimeError("--esd_steps is not supported under DeepSpeed ZeRO (one engine per flat partition); "
                                   "use FSDP2, FSDP1, DDP or one process, or --esd_steps 0")
            names, pieces = optimizer_pieces(opt)
            return opt.engine, names, pieces
        if self._own is None:
            self._own = self._build_engine()
        engine, names, params, placements = self._own
        pieces = [pl.local_view(p.to_local() if hasattr(p, "to_local") else p) for pl, p in zip(placements, params)]
        return engine, names, pieces

    def _build_engine(self) -> tuple[Any, list[str], list[torch.Tensor], list[Any]]:
        """An exchange plan for optimizers without one (AdamW), with the names, parameters and
        placements it covers; collective, built once."""
        from ..distributed.backends import describe_params, fsdp1
        from ..distributed.engine import ExchangeEngine, SpectralSpec

        named = [(self.clean(n), p) for n, p in self.model.named_parameters() if self.clean(n) in self.matrix_names]
        names = [n for n, _ in named]
        params = [p for _, p in named]
        # FSDP1 flattens parameters to 1-D views: their shapes and ranges come from its handles.
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        registry = fsdp1.collect(self.model) if FSDP.fsdp_modules(self.model) else None
        described = describe_params(params, names, registry)
        engine = ExchangeEngine(
            shapes=[pl.shape for pl in described.placements],
            local_ranges=[pl.local_range for pl in described.placements],
            specs=[SpectralSpec(power=0.0, method="eigh")] * len(names), names=names, group=described.group,
            domains=described.domains,
        )
        return engine, names, params, described.placements

    def __call__(self, step: int) -> dict[str, Any]:
        from ..distributed.owned_map import all_results, map_owned

        start = time.perf_counter()
        engine, names, pieces = self._engine_and_pieces()
        local = map_owned(engine, pieces, lambda i, W: spectral_stats(W).as_dict())
        stats = all_results(local, engine.group)
        row = stats_row(step, names, stats)
        row["esd_seconds"] = time.perf_counter() - start
        return row
