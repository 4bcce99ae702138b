"""HTMuon: Muon with a heavy-tailed spectral correction, plus AdamW for non-matrix parameters.

For each hidden matrix W (m, n) with gradient G, at step t:
    B <- lerp(B, G, 1 - beta)                  momentum (beta = 0.95)
    M  = lerp(G, B, beta)  (Nesterov) or B
    O  = U Σ^p V^T  for  M = U Σ V^T           computed once, on the matrix's owner rank
    W <- W (1 - lr·wd) - lr · max(1, m/n)^0.5 · O
With ``normuon=True`` (NorMuon at p = 0, HTNorMuon at p > 0) the owner also rescales O's rows
by a per-row second moment v (:func:`htmuon_dist.normuon.normuon_rescale`) before the scale;
v is replicated on every rank of the exchange group (docs/distributed.md).
Every other parameter gets bias-corrected AdamW with decoupled weight decay.

This module is the ``torch.optim.Optimizer`` facade: param groups, state and validation. The
arithmetic lives in :mod:`htmuon_dist.functional`, and
:class:`~htmuon_dist.distributed.engine.ExchangeEngine` streams the matrices bucket by bucket
through their owners, calling back into :class:`_MatrixUpdate` for the elementwise parts,
which run on each rank's local shard. With one process (or DDP) the same code runs with
whole matrices.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from . import functional as F
from .distributed.backends import describe_params, zero
from .distributed.engine import ExchangeEngine, SpectralSpec
from .distributed.windowed import split_placement
from .matrix_views import matrix_windows
from .integrations import install_guards
from .normuon import normuon_rescale
from .spectral import check_power, get_method, grouped as spectral_grouped, validate_power

_HTMUON_KEYS = (
    "lr", "power", "momentum", "nesterov", "weight_decay", "method", "rtol", "interval",
    "adjust_lr_fn", "normuon", "normuon_beta2", "stack_dims", "row_blocks",
)
# The key of NorMuon's per-row second moment in a parameter's state: float32, one value per
# row of the matrix (under ZeRO, the rows of every matrix of the flat partition, in order).
NORMUON_STATE = "normuon_v"
# The key of a stateful method's state (``method="stream"``: its (k, k) basis, k = min(m, n)):
# float32, shaped and sharded like the parameter, the state in the first k² entries of each
# matrix (row-major), zeros elsewhere; so it checkpoints and reshards like the momentum.
METHOD_STATE = "method_state"
# State that stays float32 whatever the parameter's dtype (torch's load casts to it).
_FLOAT32_STATE = (NORMUON_STATE, METHOD_STATE)
_ADAMW_KEYS = ("lr", "betas", "eps", "weight_decay")
# What the interval variant runs between its exact steps: Muon's Newton-Schulz polar factor.
_MUON_SPEC = SpectralSpec(power=0.0, method="ns5", rtol=None)


def _ndim(p: torch.Tensor) -> int:
    """Dimensions of the parameter's real shape (DeepSpeed ZeRO-3 partitions report 1-D)."""
    return len(zero.logical_shape(p))


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a (possibly DTensor) tensor, as a plain tensor aliasing it."""
    return t.to_local() if hasattr(t, "to_local") else t


class HTMuon(Optimizer):
    """HTMuon for hidden matrices and AdamW for the rest, in one ``torch.optim.Optimizer``.

    Routing: a param group may carry ``"htmuon": True`` or ``False``. A group without the key is
    split at construction into an HTMuon group (its >= 2-D parameters) and an AdamW group (the
    rest), so each keeps its own ``"lr"`` for LR schedulers. Use
    :func:`htmuon_dist.param_groups` to route a Hugging Face LLaMA by name.

    Args:
        params: parameters or param groups.
        lr: HTMuon learning rate (the reference uses 0.03 at 60M/135M, 5e-3 at 350M/1B).
        power: p in [0, 1]; 0 is Muon, 0.125 the paper's HTMuon.
        momentum: beta of the momentum buffer.
        nesterov: blend the gradient with the momentum (Nesterov) before the spectral map.
        weight_decay: decoupled weight decay of the HTMuon matrices (multiplied by lr).
        method: spectral method name (see ``htmuon_dist.available_methods()``). ``"stream"``
            (the reference's htmuon_stream) keeps a warm-started basis per matrix in the
            state ``"method_state"`` (float32, shaped like the parameter) and reports its
            error through :meth:`stream_error`.
        rtol: relative singular-value cutoff (default: from the momentum's dtype).
        interval: if set to k, the exact ``method`` runs on every k-th step only (steps k, 2k,
            ...) and Muon's Newton–Schulz (power 0) on the others, as the reference's
            ``htmuon_interval``; the two kinds of step have different scales under one lr.
        adjust_lr_fn: the lr scale per matrix, as torch.optim.Muon: None or "original"
            (``max(1, m/n)^0.5``, the reference's) or "match_rms_adamw" (``0.2·sqrt(max(m,
            n))``, so that an AdamW learning rate carries over).
        normuon: NorMuon's per-row normalisation of the update (the reference's ``normuon``
            with power=0 and method="ns5", HTNorMuon with power > 0, any method): the owner
            keeps ``v <- lerp(v, mean over columns of O², 1 - normuon_beta2)`` per row (no
            bias correction), divides O's rows by ``sqrt(v + 1e-10)`` and restores O's
            Frobenius norm; the lr scale above applies after. State: ``"normuon_v"``, float32,
            one value per row, identical on every rank.
        normuon_beta2: EMA factor of v, in [0, 1) (the reference: 0.95).
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: AdamW settings for non-matrix
            parameters (the reference uses lr 1e-3 at 60M-350M, betas (0.9, 0.95), eps 1e-10).
        nonfinite: what a NaN/Inf gradient does: "raise" (FloatingPointError naming the
            parameters, nothing is modified) or "skip" (the whole step is skipped on every
            rank, a warning is issued and ``skipped_steps`` counts it).
        nonfinite_patience: with ``nonfinite="skip"``, this many skipped steps in a row raise
            ``FloatingPointError`` (the run is diverging, not hitting a rare spike); None never.
        process_group: "auto" (detect from the parameters: FSDP2 mesh, FSDP1 group, or the
            world group for replicated DDP parameters), None (no communication even if
            torch.distributed is initialised), or an explicit process group.
        comm_dtype: dtype of the exchanged pieces and of the owners' whole matrices (None =
            the momentum's dtype; bf16 halves traffic and owner memory at ~3 significant
            digits). Every rank, the owner included, uses the same rounded values, so replicas
            stay bit-identical, and the rank cutoff follows this dtype.
        bucket_numel: per-rank cap on the elements one exchange bucket may hold (matrices
            owned whole + local pieces); None = twice the largest matrix, which bounds the
            step's temporaries by a few times the largest matrix (docs/distributed.md).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.02,
        power: float = 0.125,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        method: str = "eigh",
        rtol: Optional[float] = None,
        interval: Optional[int] = None,
        adjust_lr_fn: Optional[str] = None,
        normuon: bool = False,
        normuon_beta2: float = 0.95,
        adamw_lr: float = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-10,
        adamw_weight_decay: float = 0.0,
        nonfinite: str = "raise",
        nonfinite_patience: Optional[int] = 10,
        process_group: Any = "auto",
        comm_dtype: Optional[torch.dtype] = None,
        bucket_numel: Optional[int] = None,
    ) -> None:
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
        self._htmuon_defaults = dict(
            lr=lr, power=power, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
            method=method, rtol=rtol, interval=interval, adjust_lr_fn=adjust_lr_fn,
            normuon=normuon, normuon_beta2=normuon_beta2, stack_dims=None, row_blocks=None,
        )
        self._adamw_defaults = dict(
            lr=adamw_lr, betas=tuple(adamw_betas), eps=adamw_eps, weight_decay=adamw_weight_decay
        )
        self.nonfinite = nonfinite
        self.nonfinite_patience = nonfinite_patience
        self.process_group = process_group
        self.comm_dtype = comm_dtype
        self.bucket_numel = bucket_numel
        self.skipped_steps = 0
        self._skipped_in_a_row = 0
        self._engine: Optional[ExchangeEngine] = None
        self._placements: list = []
        self._matrices: list = []  # _matrix_params() cut into matrix windows, as the engine sees them
        self._fsdp1_registry: dict = {}
        # key -> (engine, placements, backend); one entry, or one per flat partition under ZeRO
        # (DeepSpeed steps each param group's partition in a separate step() call).
        self._engines: dict[tuple, tuple] = {}
        # (group dict, original params, names) per param group: DeepSpeed ZeRO swaps a group's
        # "params" for one flat partition, and the originals carry the partition metadata.
        self._origins: list[tuple[dict, list[torch.Tensor], list[str]]] = []
        groups = list(params)
        if not groups:
            raise ValueError("HTMuon got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        super().__init__([g for group in groups for g in self._split(group)], {})
        self._use_muon_guards = install_guards(self)

    # -- param groups ------------------------------------------------------------------------

    def _split(self, group: dict) -> list[dict]:
        """A group without "htmuon" becomes a matrix group and an AdamW group."""
        group = dict(group)
        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        if "htmuon" in group:
            group["params"] = params
            return [group]
        names = group.pop("param_names", None)
        out = []
        for is_matrix in (True, False):
            chosen = [i for i, p in enumerate(params) if (_ndim(p) >= 2) == is_matrix]
            if not chosen:
                continue
            if is_matrix:  # the group's own keys are HTMuon's; adamw_* keys go to the other half
                sub = {k: v for k, v in group.items() if not k.startswith("adamw_")}
            else:
                sub = {k: v for k, v in group.items() if k not in _HTMUON_KEYS}
            sub.update(params=[params[i] for i in chosen], htmuon=is_matrix)
            if names is not None:
                sub["param_names"] = [names[i] for i in chosen]
            out.append(sub)
        return out

    def add_param_group(self, param_group: dict) -> None:
        """Adds a group, filling HTMuon or AdamW defaults and validating them."""
        if "htmuon" not in param_group:
            for sub in self._split(param_group):
                self.add_param_group(sub)
            return
        param_group = dict(param_group)
        if param_group["htmuon"]:
            defaults = self._htmuon_defaults
        else:
            defaults = self._adamw_defaults
            for key in _ADAMW_KEYS:  # "adamw_lr" in an AdamW group means its "lr"
                if f"adamw_{key}" in param_group:
                    param_group[key] = param_group.pop(f"adamw_{key}")
        for key, value in defaults.items():
            param_group.setdefault(key, value)
        self._validate_group(param_group)
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        names = param_group.get("param_names") or [
            f"param_groups[{len(self.param_groups)}].params[{j}]" for j in range(len(params))
        ]
        zero.check_not_tagged(params, names)
        if param_group["htmuon"]:
            if param_group["row_blocks"] is not None:
                param_group["row_blocks"] = tuple(int(b) for b in param_group["row_blocks"])
            for p, name in zip(params, names):  # refuses bad stack_dims / row_blocks now
                shape = zero.logical_shape(p)
                if len(shape) >= 2:  # FSDP1 flattens parameters to 1-D: checked at the first step
                    matrix_windows(shape, param_group["stack_dims"], param_group["row_blocks"], name)
        super().add_param_group(param_group)
        self._origins.append((self.param_groups[-1], params, list(names)))
        self._engine = None
        self._engines.clear()

    def _validate_group(self, group: dict) -> None:
        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ValueError(
                f"a param group mixes devices {sorted(map(str, devices))}; move the model to one "
                f"device before building the optimizer (or use one group per device)"
            )
        if not 0.0 <= float(group["lr"]):
            raise ValueError(f"lr must be >= 0, got {group['lr']}")
        if group["htmuon"]:
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
        else:
            beta1, beta2 = group["betas"]
            if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
                raise ValueError(f"adamw_betas must be in [0, 1), got {group['betas']}")
            if not group["eps"] > 0.0:
                raise ValueError(f"adamw_eps must be > 0, got {group['eps']}")

    # -- distribution ------------------------------------------------------------------------

    def _origin_of(self, group: dict) -> Optional[tuple[dict, list[torch.Tensor], list[str]]]:
        for origin in self._origins:
            if origin[0] is group:
                return origin
        return None

    def _zero_members(self, group: dict) -> Optional[list[tuple[torch.Tensor, str]]]:
        """The original (param, name) pairs inside the group's DeepSpeed ZeRO flat partition, or
        None when the group holds ordinary parameters."""
        params = group["params"]
        origin = self._origin_of(group)
        if origin is None or len(params) != 1 or not origin[1]:
            return None
        flat, originals = params[0], origin[1]
        if any(flat is p for p in originals) or not any(zero.is_zero_param(p) for p in originals):
            return None
        zero.check_not_tagged(originals, origin[2])
        return zero.members_of_flat(flat, list(zip(originals, origin[2])))

    def _matrix_params(self) -> list[tuple[torch.Tensor, dict, str, Optional[torch.Tensor]]]:
        """(tensor holding the piece, group, name, original ZeRO parameter or None) per matrix."""
        out = []
        for g_index, group in enumerate(self.param_groups):
            if not group["htmuon"]:
                continue
            members = self._zero_members(group)
            if members is not None:  # one flat partition holding several matrices
                out.extend((group["params"][0], group, name, p) for p, name in members)
                continue
            names = group.get("param_names")
            for j, p in enumerate(group["params"]):
                name = names[j] if names else f"param_groups[{g_index}].params[{j}]"
                out.append((p, group, name, None))
        return out

    def _spec(self, group: dict) -> SpectralSpec:
        return SpectralSpec(power=float(group["power"]), method=group["method"], rtol=group["rtol"])

    def _ensure_engine(self, matrices: list[tuple[torch.Tensor, dict, str, Optional[torch.Tensor]]]) -> ExchangeEngine:
        """Builds layouts and the plan lazily: Accelerate swaps parameters after construction.
        Under ZeRO there is one engine per flat partition, built collectively at its first step."""
        key = tuple((id(p), n, id(o)) for p, _, n, o in matrices) + tuple(
            (g["power"], g["method"], g["rtol"], g["normuon"], g["stack_dims"], g["row_blocks"])
            for _, g, _, _ in matrices
        )
        if key in self._engines:
            self._engine, self._placements, self.backend, self._matrices = self._engines[key]
            return self._engine
        params = [p for p, _, _, _ in matrices]
        names = [n for _, _, n, _ in matrices]
        origins = [o for _, _, _, o in matrices]
        described = describe_params(params, names, self._fsdp1_registry, self.process_group,
                                    zero_origins=origins)
        self.backend = described.backend
        matrices, self._placements = self._windows(matrices, described.placements, described.group)
        self._matrices = matrices
        self._engine = ExchangeEngine(
            shapes=[pl.shape for pl in self._placements],
            local_ranges=[pl.local_range for pl in self._placements],
            specs=[self._spec(g) for _, g, _, _ in matrices],
            names=[n for _, _, n, _ in matrices],
            group=described.group,
            comm_dtype=self.comm_dtype,
            bucket_numel=self.bucket_numel,
            domains=described.domains,
            extra_numels=[pl.shape[0] if g["normuon"] else 0
                          for pl, (_, g, _, _) in zip(self._placements, matrices)],
            wire_orders=[pl.wire_order for pl in self._placements],
        )
        if described.backend != "zero":  # a new parameter set replaces the old one
            self._engines.clear()
        self._engines[key] = (self._engine, self._placements, self.backend, self._matrices)
        return self._engine

    def _windows(self, matrices, placements, group) -> tuple[list, list]:
        """Each parameter's placement cut into its matrix windows (``stack_dims``,
        ``row_blocks``): one engine matrix per expert / row block, named ``name[e].rows[a:b]``."""
        rank = dist.get_rank(group) if group is not None else 0
        out_m, out_p = [], []
        for (p, group_, name, origin), placement in zip(matrices, placements):
            flat = self._fsdp1_registry.get(id(p))  # FSDP1 views are 1-D: the original shape
            shape = flat.shape if flat is not None else zero.logical_shape(origin if origin is not None else p)
            windows = matrix_windows(shape, group_["stack_dims"], group_["row_blocks"], name)
            split = split_placement(placement, windows, rank, name)
            if any(pl.wire_order is not None for pl in split) and get_method(group_["method"]).stateful:
                raise ValueError(
                    f"{name}: method={group_['method']!r} keeps state per matrix, which tensor-"
                    f"parallel pieces cannot address yet; use a stateless method (eigh, gram32, ...)"
                )
            out_m.extend((p, group_, name + w.label, origin) for w in windows)
            out_p.extend(split)
        return out_m, out_p

    @property
    def engine(self) -> Optional[ExchangeEngine]:
        """The exchange engine (None before the first step)."""
        return self._engine

    @property
    def comm_bytes_last_step(self) -> int:
        """Bytes this rank sent for the spectral exchange in the last step (under ZeRO: summed
        over the flat partitions, each exchanged in its own step() call)."""
        return sum(entry[0].comm_bytes_last_step for entry in self._engines.values())

    def stream_error(self) -> Optional[float]:
        """The largest error estimate of the last step over the matrices of a stateful method
        (``method="stream"``): the RMS cosine between the columns of its ``U`` (0 once the
        warm-started basis is the singular basis; docs/spectral.md relates it to the error
        against the exact update). None when no matrix ran such a method in the last step.

        Collective over the exchange group(s) (call it on every rank) when some group's method
        keeps state; one host sync per exchange engine.
        """
        if not any(g["htmuon"] and get_method(g["method"]).stateful is not None for g in self.param_groups):
            return None
        found = None
        for engine, *_ in self._engines.values():
            errs = list(engine.state_errors.values())
            local = torch.stack(errs).max().reshape(1) if errs else torch.full((1,), -1.0)
            if engine.world_size > 1:
                coll = engine.collective_device()
                local = local.to(coll)
                torch.distributed.all_reduce(local, op=torch.distributed.ReduceOp.MAX, group=engine.group)
            value = float(local.item())
            if value >= 0 and (found is None or value > found):
                found = value
        return found

    def memory_bound(self) -> int:
        """This rank's contract for the bytes a step allocates beyond parameters, gradients
        and optimizer state (docs/distributed.md, "Memory contract"): the exchange's peak
        (:meth:`ExchangeEngine.memory_bound`), or the non-finite check's and AdamW's
        temporaries if larger (they run before and after it). Valid after the first step."""
        if not self._engines and not any(not g["htmuon"] for g in self.param_groups):
            raise RuntimeError("memory_bound() needs the layouts: call it after the first step()")
        params = [p for p, _, _, _ in self._matrix_params()]
        wire = self.comm_dtype
        elem = (torch.empty(0, dtype=wire).element_size() if wire is not None
                else max((p.element_size() for p in params), default=4))
        on_cuda = any(p.is_cuda for p in params)
        lanes = spectral_grouped.DEFAULT_STREAMS if on_cuda else 1
        bound = max((entry[0].memory_bound(wire_bytes=elem, lanes=lanes)
                     for entry in self._engines.values()), default=0)
        local = [_local(p) for g in self.param_groups for p in g["params"]]
        largest = max((t.numel() for t in local), default=0)
        adamw = [_local(p) for g in self.param_groups if not g["htmuon"] for p in g["params"]]
        adamw_temp = max((t.numel() * t.element_size() for t in adamw), default=0)
        return max(bound, largest, adamw_temp)  # the non-finite check: one bool per element

    # -- the step ----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step; collective over the exchange group. Host synchronisations: one
        (the step's small collective, or the non-finite check with one process); more only
        when a non-finite gradient is found, to name it."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        matrices = self._matrix_params()
        engine = self._ensure_engine(matrices) if matrices else None
        matrices = self._matrices if matrices else []  # one entry per matrix window
        adamw = [(p, g) for g in self.param_groups if not g["htmuon"] for p in g["params"]
                 if p.grad is not None]

        views = [pl.local_view for pl in self._placements] if matrices else []
        grads = [
            views[i](_local(p.grad)) if p.grad is not None else None
            for i, (p, _, _, _) in enumerate(matrices)
        ]
        local_grads = [g for g in grads if g is not None and g.numel()]
        local_grads += [_local(p.grad) for p, _ in adamw if _local(p.grad).numel()]
        flag, device = _nonfinite_flag(local_grads)
        step_no = self._next_step_number(matrices, adamw)
        if engine is not None:
            has_piece = [g is not None and g.numel() > 0 for g in grads]
            any_bad, active = engine.sync_step(step_no, flag, has_piece, device)
        else:
            any_bad, active = bool(flag), []
        if any_bad:
            self._skip_or_raise(matrices, grads, adamw)
            return loss
        self._skipped_in_a_row = 0

        if matrices:
            update = _MatrixUpdate(self, matrices, views, grads, active)
            specs = [
                _MUON_SPEC if g["interval"] and step_no % g["interval"] != 0 else self._spec(g)
                for _, g, _, _ in matrices
            ]
            engine.step(update, active, specs)
            update.count_step()
        self._adamw_step(adamw)
        return loss

    def _skip_or_raise(self, matrices, grads, adamw) -> None:
        bad = _nonfinite_names(matrices, grads, adamw)
        where = ", ".join(bad) if bad else "on another rank"
        if self.nonfinite == "raise":
            raise FloatingPointError(
                f"HTMuon: non-finite gradient ({where}); nothing was updated. Lower the lr, "
                f"clip gradients, or pass nonfinite='skip' to skip such steps"
            )
        self.skipped_steps += 1
        self._skipped_in_a_row += 1
        if self.nonfinite_patience is not None and self._skipped_in_a_row >= self.nonfinite_patience:
            raise FloatingPointError(
                f"HTMuon: {self._skipped_in_a_row} steps in a row had non-finite gradients "
                f"(last: {where}); the run is diverging rather than hitting a rare spike. Lower "
                f"the lr, clip gradients, or resume from an earlier checkpoint (nonfinite_patience="
                f"{self.nonfinite_patience})"
            )
        warnings.warn(f"HTMuon: skipped a step with non-finite gradients ({where})")

    def _next_step_number(self, matrices, adamw) -> int:
        """The 1-based number of the step about to run (the same on every rank)."""
        for p, *_ in matrices or adamw:
            state = self.state.get(p)
            if state and "step" in state:
                return int(state["step"]) + 1
        return 1

    def _adamw_step(self, adamw) -> None:
        """AdamW per param group, in chunks that bound the temporaries (the denominators) by
        the largest chunk rather than by all AdamW parameters together."""
        by_group: dict[int, tuple[dict, list[torch.Tensor]]] = {}
        for p, group in adamw:
            by_group.setdefault(id(group), (group, []))[1].append(p)
        for group, params in by_group.values():
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
            for chunk in _chunks(params, max(p.numel() for p in params)):
                states = [self.state[p] for p in chunk]
                F.adamw_(
                    [_local(p) for p in chunk], [_local(p.grad) for p in chunk],
                    [_local(s["exp_avg"]) for s in states], [_local(s["exp_avg_sq"]) for s in states],
                    [int(s["step"]) for s in states],
                    lr=group["lr"], betas=group["betas"], eps=group["eps"],
                    weight_decay=group["weight_decay"],
                )

    def load_state_dict(self, state_dict: dict) -> None:
        before = list(self.param_groups)
        # torch casts floating state to the parameter's dtype; NorMuon's v and the method state
        # stay float32 (the same mapping from saved ids to parameters as torch's).
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        kept = [
            (params[j], key, st[key])
            for j, saved in enumerate(saved_ids) if j < len(params)
            for st in [state_dict["state"].get(saved, {})] for key in _FLOAT32_STATE if key in st
        ]
        super().load_state_dict(state_dict)
        for p, key, value in kept:
            self.state[p][key] = value.detach().to(device=_local(p).device, dtype=torch.float32).clone()
        # torch replaces the group dicts: carry each group's originals over to its new dict.
        by_group = {id(origin[0]): origin for origin in self._origins}
        self._origins = [
            (new, by_group[id(old)][1], by_group[id(old)][2])
            for old, new in zip(before, self.param_groups) if id(old) in by_group
        ]
        self._engine = None  # rebuilt at the next step from the (possibly new) parameters
        self._engines.clear()


class _MatrixUpdate:
    """HTMuon's side of one step for the exchange engine (its ``MatrixUpdate``): momentum,
    the transform input and the update, each on this rank's local pieces only.

    Pieces are flat local views (``views[i]``) of the parameter, its gradient and the momentum;
    a matrix's global flat offsets ``[start, end)`` map to ``[start - s0, end - s0)`` of the
    view, where ``s0`` is the start of this rank's range.
    """

    def __init__(self, opt: HTMuon, matrices, views, grads, active: Sequence[bool]) -> None:
        self.opt = opt
        self.matrices = matrices
        self.views = views
        self.active = list(active)
        self.bufs: list[Optional[torch.Tensor]] = [None] * len(matrices)
        self.grads: list[Optional[torch.Tensor]] = list(grads)
        self.row_state: list[Optional[torch.Tensor]] = [None] * len(matrices)
        self.method_state: list[Optional[torch.Tensor]] = [None] * len(matrices)
        self._device = torch.device("cpu")
        for i, (p, group, name, _) in enumerate(matrices):
            if not self.active[i]:
                continue
            state = opt.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
                state["step"] = torch.tensor(0.0)
            self.bufs[i] = views[i](_local(state["momentum_buffer"]))
            if get_method(group["method"]).stateful is not None:
                self.method_state[i] = views[i](_local(_method_state(state, p, name)))
            self._device = self.bufs[i].device
            if self.grads[i] is None:  # other ranks hold this matrix's gradient
                self.grads[i] = torch.zeros_like(self.bufs[i])
        self._init_row_state()

    def _init_row_state(self) -> None:
        """Views of NorMuon's v for the active normuon matrices. One float32 tensor per
        parameter tensor: its matrices' rows one after the other (one matrix, or the matrices
        of a ZeRO flat partition in the engine's order), the same size on every rank."""
        offsets: list[int] = []
        totals: dict[int, int] = {}
        for i, (p, group, _, _) in enumerate(self.matrices):
            rows = self.opt._placements[i].shape[0] if group["normuon"] else 0
            offsets.append(totals.get(id(p), 0))
            totals[id(p)] = offsets[-1] + rows
        for i, (p, group, name, _) in enumerate(self.matrices):
            if not (self.active[i] and group["normuon"]):
                continue
            state = self.opt.state[p]
            v = state.get(NORMUON_STATE)
            if v is None:
                v = state[NORMUON_STATE] = torch.zeros(totals[id(p)], dtype=torch.float32,
                                                       device=_local(p).device)
            elif v.shape != (totals[id(p)],) or v.dtype != torch.float32:
                raise ValueError(
                    f"{name}: the NorMuon state {NORMUON_STATE!r} has {v.dtype} "
                    f"{tuple(v.shape)}, expected float32 ({totals[id(p)]},) (one value per row); "
                    f"was the checkpoint saved from another model or partitioning?"
                )
            rows = self.opt._placements[i].shape[0]
            self.row_state[i] = v.narrow(0, offsets[i], rows)

    def finish(self, i: int, result: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """On matrix i's owner (engine's row-state hook): NorMuon's rescale of the (m, n)
        spectral result and the new v (float32 (m,)); v itself is stored by apply_extra."""
        v = self.row_state[i]
        assert v is not None, "finish() called for a matrix without NorMuon state"
        return normuon_rescale(result, v, float(self.matrices[i][1]["normuon_beta2"]))

    def apply_extra(self, items: Sequence[tuple[int, torch.Tensor]]) -> None:
        """On every rank: stores the new v of each matrix (the owner's, bit for bit)."""
        for i, v in items:
            self.row_state[i].copy_(v)  # type: ignore[union-attr]

    def state_into(self, i: int, a: int, b: int, out: torch.Tensor) -> None:
        """Copies ``[a, b)`` of matrix i's method state (global offsets in this rank's part)."""
        base = self._base(i)
        out.copy_(self.method_state[i][a - base : b - base])  # type: ignore[index]

    def apply_state(self, items: Sequence[tuple[int, int, torch.Tensor]]) -> None:
        """Stores the new method state of matrix i from global offset a (this rank's part)."""
        for i, a, values in items:
            base = self._base(i)
            self.method_state[i][a - base : a - base + values.numel()].copy_(values)  # type: ignore[index]

    @property
    def device(self) -> torch.device:
        return self._device

    def dtype(self, i: int) -> torch.dtype:
        return self.bufs[i].dtype  # type: ignore[union-attr]

    def _base(self, i: int) -> int:
        return self.opt._placements[i].local_range[0]

    def prepare(self, indices: Sequence[int]) -> None:
        by_beta: dict[float, tuple[list, list]] = {}
        for i in indices:
            buf = self.bufs[i]
            if buf is not None and buf.numel():
                bufs, grads = by_beta.setdefault(self.matrices[i][1]["momentum"], ([], []))
                bufs.append(buf)
                grads.append(self.grads[i])
        for beta, (bufs, grads) in by_beta.items():
            F.momentum_(bufs, grads, beta)

    def source_into(self, i: int, start: int, end: int, out: torch.Tensor) -> None:
        group = self.matrices[i][1]
        a, b = start - self._base(i), end - self._base(i)
        F.nesterov_into(out, self.grads[i][a:b], self.bufs[i][a:b],  # type: ignore[index]
                        group["momentum"], group["nesterov"])

    def apply(self, items: Sequence[tuple[int, torch.Tensor]]) -> None:
        params, updates, lrs, decays, scales = [], [], [], [], []
        for i, piece in items:
            p, group, _, _ = self.matrices[i]
            rows, cols = self.opt._placements[i].shape
            params.append(self.views[i](_local(p)))
            updates.append(piece)
            lrs.append(group["lr"])
            decays.append(group["weight_decay"])
            scales.append(F.muon_scale(rows, cols, group["adjust_lr_fn"]))
        F.decay_and_update_(params, updates, lrs, decays, scales)

    def count_step(self) -> None:
        """One step per parameter tensor (a ZeRO flat partition holds several matrices)."""
        stepped: set[int] = set()
        for i, (p, _, _, _) in enumerate(self.matrices):
            if self.active[i] and id(p) not in stepped:
                stepped.add(id(p))
                self.opt.state[p]["step"] += 1


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


def _nonfinite_flag(grads: Sequence[torch.Tensor]) -> tuple["torch.Tensor | bool", Optional[torch.device]]:
    """Whether any of ``grads`` holds a NaN/Inf, as a 0-d tensor left on the device (no host
    synchronisation here), and that device."""
    if not grads:
        return False, None
    device = grads[0].device
    ok = torch.stack([torch.isfinite(g).all().to(device) for g in grads]).all()
    return ~ok, device


def _nonfinite_names(matrices, grads, adamw) -> list[str]:
    """The names of the tensors with NaN/Inf (synchronises; only on the failing path)."""
    names = [name for (_, _, name, _), g in zip(matrices, grads)
             if g is not None and g.numel() and not bool(torch.isfinite(g).all())]
    return names + [f"adamw param {j} {tuple(p.shape)}" for j, (p, _) in enumerate(adamw)
                    if not bool(torch.isfinite(_local(p.grad)).all())]


def _chunks(params: list[torch.Tensor], numel: int) -> list[list[torch.Tensor]]:
    """Consecutive tensors in lists of at most ``numel`` elements (at least one each)."""
    out: list[list[torch.Tensor]] = []
    size = 0
    for p in params:
        if not out or size + p.numel() > numel:
            out.append([])
            size = 0
        out[-1].append(p)
        size += p.numel()
    return out


def attach_fsdp1(optimizer: HTMuon, model: torch.nn.Module) -> HTMuon:
    """Tells ``optimizer`` where each FSDP1 (``use_orig_params=True``) parameter's piece lives.

    One line after wrapping: ``attach_fsdp1(opt, fsdp_model)``. Needed because FSDP1 flattens
    the original parameters into 1-D views that no longer carry their shapes.
    """
    from .distributed.backends import fsdp1

    optimizer._fsdp1_registry = fsdp1.collect(model)
    optimizer._engine = None
    return optimizer
