"""A matrix set: the matrices of one partition, with their placements, state views and the
update callbacks the exchange engine calls.

One process, DDP, FSDP1 and FSDP2 have one matrix set per optimizer; DeepSpeed ZeRO has one
per flat partition (DeepSpeed steps each partition in its own ``step()`` call), so each set
keeps its own engine, plan and memory bound, and nothing is "the current engine".

A *matrix* is a window of a parameter tensor: its placement maps the parameter (or its
gradient, or a state tensor shaped like it) to this rank's flat piece of the matrix; a ZeRO
flat partition holds several matrices one after the other.

The set implements :class:`~htmuon_dist.distributed.engine.MatrixUpdate`. The momentum is
updated when the result is applied, not before the gather: the transform input is computed on
the fly from the old momentum and the gradient (``B' = lerp(B, G, 1 - beta)``, then the
Nesterov blend, in chunks of :data:`~.engine.SOURCE_CHUNK` elements), so that a step with a
non-finite gradient on any rank, known only after the first gather, can leave every tensor
untouched. Every write is gated on the device by ``keep`` (1.0, or 0.0 when some rank saw a
NaN/Inf); the gradients were made finite beforehand so that a gated write is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from .. import functional as F
from ..normuon import normuon_rescale
from ..spectral import get_method
from .engine import SOURCE_CHUNK, ExchangeEngine, SpectralSpec, _as_piece

# The key of NorMuon's per-row second moment in a parameter's state: float32, one value per
# row of the matrix (under ZeRO, the rows of every matrix of the flat partition, in order).
NORMUON_STATE = "normuon_v"
# The key of a stateful method's state (``method="stream"``: its (k, k) basis, k = min(m, n)):
# float32, shaped and sharded like the parameter, the state in the first k² entries of each
# matrix (row-major), zeros elsewhere; so it checkpoints and reshards like the momentum.
METHOD_STATE = "method_state"


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a (possibly DTensor) tensor, as a plain tensor aliasing it."""
    return t.to_local() if hasattr(t, "to_local") else t


@dataclass(frozen=True)
class MatrixEntry:
    """One matrix: the tensor holding its piece, its param group, its name and (ZeRO) the
    original parameter whose window of the flat partition it is."""

    param: torch.Tensor
    group: dict
    name: str
    origin: Optional[torch.Tensor] = None


class MatrixSet:
    """The matrices of one partition and their engine (this rank's side).

    Args:
        entries: the matrices, in the same order on every rank.
        placements: per matrix, its :class:`~.backends.MatrixPlacement`.
        engine: the exchange engine built for them.
        backend: the backend's name ("fsdp2", "zero", "replicated", ...).
    """

    def __init__(self, entries: Sequence[MatrixEntry], placements: Sequence[Any],
                 engine: ExchangeEngine, backend: str) -> None:
        self.entries = list(entries)
        self.placements = list(placements)
        self.engine = engine
        self.backend = backend
        self.active: list[bool] = [True] * len(self.entries)
        self.local_pattern: tuple[bool, ...] = ()
        self.host_step: int = 0  # the 1-based number of the last step() (host-side counter)
        self.keeps_row_state = any(e.group["normuon"] for e in self.entries)
        self.keeps_method_state = any(get_method(e.group["method"]).stateful is not None for e in self.entries)
        self.device = torch.device("cpu")
        self._views: Optional[list] = None
        # per step
        self.state: dict = {}
        self.grads: list[Optional[torch.Tensor]] = []
        self.keep: Optional[torch.Tensor] = None
        self._weights: dict[tuple, torch.Tensor] = {}
        self._momentum_done: list[bool] = []

    # -- set-up -------------------------------------------------------------------------

    def has_piece(self) -> list[bool]:
        """Per matrix, whether this rank has a gradient piece for it (host-side, no read)."""
        out = []
        for e, pl in zip(self.entries, self.placements):
            g = e.param.grad
            held = sum(b - a for a, b in _as_piece(pl.local_range))  # one range or a TP tuple
            out.append(g is not None and held > 0)
        return out

    def pattern(self) -> tuple[bool, ...]:
        return tuple(e.param.grad is not None for e in self.entries)

    def first_step_number(self, state: dict) -> int:
        """The 1-based number of the step about to run, from the state (a host read; only at
        build and check time)."""
        for e in self.entries:
            st = state.get(e.param)
            if st and "step" in st:
                return int(st["step"]) + 1
        return 1

    def _state_views(self, state: dict) -> list[tuple]:
        """Per matrix: (momentum view, method-state view or None, row-state view or None),
        creating state at the first step. Cached while the state tensors stay the same."""
        if self._views is not None and all(
            state.get(e.param, {}).get("momentum_buffer") is src
            for e, src in zip(self.entries, self._sources)
        ):
            return self._views
        views, sources = [], []
        offsets: list[int] = []
        totals: dict[int, int] = {}
        for e, pl in zip(self.entries, self.placements):
            rows = pl.shape[0] if e.group["normuon"] else 0
            offsets.append(totals.get(id(e.param), 0))
            totals[id(e.param)] = offsets[-1] + rows
        for i, (e, pl) in enumerate(zip(self.entries, self.placements)):
            p = e.param
            st = state[p]
            if "momentum_buffer" not in st:
                st["momentum_buffer"] = torch.zeros_like(p)
            if "step" not in st:
                st["step"] = torch.zeros((), dtype=torch.float32, device=local(p).device)
            elif st["step"].device != local(p).device or st["step"].dtype != torch.float32:
                # a counter set by hand (e.g. torch.tensor(0.0) on the CPU): the step adds the
                # device-side keep flag to it, so it lives with the parameter
                st["step"] = st["step"].to(device=local(p).device, dtype=torch.float32)
            buf = pl.local_view(local(st["momentum_buffer"]))
            method = None
            if get_method(e.group["method"]).stateful is not None:
                method = pl.local_view(local(_method_state(st, p, e.name)))
            rows = None
            if e.group["normuon"]:
                v = st.get(NORMUON_STATE)
                if v is None:
                    v = st[NORMUON_STATE] = torch.zeros(totals[id(p)], dtype=torch.float32,
                                                        device=local(p).device)
                elif v.shape != (totals[id(p)],) or v.dtype != torch.float32:
                    raise ValueError(
                        f"{e.name}: the NorMuon state {NORMUON_STATE!r} has {v.dtype} "
                        f"{tuple(v.shape)}, expected float32 ({totals[id(p)]},) (one value per "
                        f"row); was the checkpoint saved from another model or partitioning?"
                    )
                rows = v.narrow(0, offsets[i], pl.shape[0])
            views.append((buf, method, rows, pl.local_view(local(p))))
            sources.append(st["momentum_buffer"])
            self.device = buf.device
        self._views, self._sources = views, sources
        return views

    # -- the step -------------------------------------------------------------------------

    def local_grads(self) -> list[Optional[torch.Tensor]]:
        """Per matrix, this rank's flat gradient piece (None without a gradient)."""
        return [pl.local_view(local(e.param.grad)) if e.param.grad is not None else None
                for e, pl in zip(self.entries, self.placements)]

    def step(self, state: dict, grads: Sequence[Optional[torch.Tensor]], specs: Sequence[SpectralSpec],
             nonfinite: torch.Tensor) -> torch.Tensor:
        """One exchange step over the active matrices; returns ``keep`` (0-d float32 on the
        device: 1.0, or 0.0 when some rank saw a non-finite gradient and nothing changed)."""
        self.state = state
        views = self._state_views(state)
        self.grads = [
            g if g is not None else (torch.zeros_like(views[i][0]) if self.active[i] else None)
            for i, g in enumerate(grads)
        ]
        self.keep = None
        self._weights = {}
        self._momentum_done = [False] * len(self.entries)
        self.engine.step(self, self.active, specs, nonfinite=nonfinite)
        assert self.keep is not None
        keep = self.keep
        stepped: set[int] = set()
        for e, on in zip(self.entries, self.active):
            if on and id(e.param) not in stepped:
                stepped.add(id(e.param))
                state[e.param]["step"].add_(keep)
        self.grads, self.state = [], {}
        return keep

    # MatrixUpdate: called by the engine during step()

    def dtype(self, i: int) -> torch.dtype:
        return self._views[i][0].dtype  # type: ignore[index]

    def agreed(self, found: torch.Tensor) -> None:
        self.keep = 1.0 - found

    def _weight(self, value: float, dtype: torch.dtype) -> torch.Tensor:
        """``value · keep`` as a 0-d tensor of ``dtype`` (cached for the step)."""
        key = (value, dtype)
        w = self._weights.get(key)
        if w is None:
            w = self._weights[key] = (self.keep * value).to(dtype)  # type: ignore[operator]
        return w

    def source_into(self, i: int, a: int, b: int, out: torch.Tensor) -> None:
        """Matrix i's transform input at local ``[a, b)``: ``lerp(G, B', beta)`` with Nesterov,
        else ``B'``, where ``B' = lerp(B, G, 1 - beta)`` is the new momentum.

        Once the step's non-finite flag is agreed (one process; buckets after the first) and
        the span is the whole local piece, the momentum is updated in place here, gated, and
        the input read from it, as a plain step would; before that (the first bucket's gather)
        ``B'`` is computed on the fly from the old momentum, in chunks, and stored at apply."""
        group = self.entries[i].group
        beta = group["momentum"]
        buf, grad = self._views[i][0], self.grads[i]  # type: ignore[index]
        if self.keep is not None and a == 0 and b == buf.numel():
            buf.lerp_(grad, self._weight(1.0 - beta, buf.dtype))  # type: ignore[arg-type]
            self._momentum_done[i] = True
            F.nesterov_into(out, grad, buf, beta, group["nesterov"])  # type: ignore[arg-type]
            return
        if not group["nesterov"]:
            torch.lerp(buf[a:b], grad[a:b], 1.0 - beta, out=out)  # type: ignore[index]
            return
        for s in range(a, b, SOURCE_CHUNK):
            e = min(b, s + SOURCE_CHUNK)
            new_buf = torch.lerp(buf[s:e], grad[s:e], 1.0 - beta)  # type: ignore[index]
            F.nesterov_into(out[s - a : e - a], grad[s:e], new_buf, beta, True)  # type: ignore[index]

    def state_into(self, i: int, a: int, b: int, out: torch.Tensor) -> None:
        out.copy_(self._views[i][1][a:b])  # type: ignore[index]

    def finish_rows(self, i: int, result: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """On matrix i's owner: NorMuon's rescale of the (m, n) result and the new v."""
        return normuon_rescale(result, self._views[i][2], float(self.entries[i].group["normuon_beta2"]))  # type: ignore[index]

    def apply_rows(self, items: Sequence[tuple[int, torch.Tensor]]) -> None:
        for i, v in items:  # lerp by keep: exactly v, or the old value
            self._views[i][2].lerp_(v, self.keep)  # type: ignore[index]

    def apply_state(self, items: Sequence[tuple[int, int, torch.Tensor]]) -> None:
        for i, a, values in items:
            part = self._views[i][1][a : a + values.numel()]  # type: ignore[index]
            part.lerp_(values, self.keep)

    def apply(self, items: Sequence[tuple[int, torch.Tensor]]) -> None:
        """Momentum, weight decay and the scaled update of each (i, piece), gated by keep."""
        params, updates, lrs, decays, scales = [], [], [], [], []
        for i, piece in items:
            e = self.entries[i]
            group = e.group
            buf, grad = self._views[i][0], self.grads[i]
            if not self._momentum_done[i]:
                buf.lerp_(grad, self._weight(1.0 - group["momentum"], buf.dtype))  # type: ignore[arg-type]
            rows, cols = self.placements[i].shape
            params.append(self._views[i][3])
            updates.append(piece)
            lrs.append(group["lr"])
            decays.append(group["weight_decay"])
            scales.append(F.muon_scale(rows, cols, group["adjust_lr_fn"]))
        if not params:
            return
        torch._foreach_mul_(updates, self._weight(1.0, updates[0].dtype))
        F.decay_and_update_(params, updates, lrs, decays, scales, keep=self.keep)


def _method_state(state: dict, p: torch.Tensor, name: str) -> torch.Tensor:
    """The parameter's method state (created as zeros: a cold start), checked."""
    value = state.get(METHOD_STATE)
    if value is None:
        value = state[METHOD_STATE] = torch.zeros_like(p, dtype=torch.float32)
    elif value.shape != p.shape or value.dtype != torch.float32:
        raise ValueError(
            f"{name}: the method state {METHOD_STATE!r} has {value.dtype} {tuple(value.shape)}, "
            f"expected float32 {tuple(p.shape)} (shaped like the parameter); was the checkpoint "
            f"saved from another model or partitioning?"
        )
    return value
