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

This module is the ``torch.optim.Optimizer`` facade: param groups, hyper-parameters,
validation, state_dict and AdamW. The arithmetic lives in :mod:`htmuon_dist.functional`; the
matrices of each partition form a :class:`~htmuon_dist.distributed.matrix_set.MatrixSet`
(placements, state views, the update callbacks), whose
:class:`~htmuon_dist.distributed.engine.ExchangeEngine` streams them bucket by bucket through
their owners. With one process (or DDP) the same code runs with whole matrices.
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
from .distributed.matrix_set import METHOD_STATE, NORMUON_STATE, MatrixEntry, MatrixSet
from .distributed.windowed import split_placement
from .matrix_views import matrix_windows
from .integrations import install_guards
from .spectral import check_power, get_method, grouped as spectral_grouped, validate_power

_HTMUON_KEYS = (
    "lr", "power", "momentum", "nesterov", "weight_decay", "method", "rtol", "interval",
    "adjust_lr_fn", "normuon", "normuon_beta2", "stack_dims", "row_blocks",
)
# State that stays float32 whatever the parameter's dtype (torch's load casts to it).
_FLOAT32_STATE = (NORMUON_STATE, METHOD_STATE)
# State shaped like the parameter (checked at load_state_dict).
_SHAPED_STATE = ("momentum_buffer", "exp_avg", "exp_avg_sq", METHOD_STATE)
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
        nonfinite: what a NaN/Inf gradient does. Either way the step is skipped on the device
            on every rank (nothing is modified, GradScaler's found-inf pattern) without a host
            read, and ``skipped_steps`` counts it (read lazily). At the next check (see
            ``check_every``) "raise" raises FloatingPointError (naming the parameters when the
            checked step is the bad one) and "skip" issues a warning.
        nonfinite_patience: with ``nonfinite="skip"``, this many skipped steps in a row raise
            ``FloatingPointError`` at the next check (the run is diverging, not hitting a rare
            spike); None never.
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
        check_every: every this many steps (and at each matrix set's first step), one small
            collective and host read check that the ranks agree (step number, plan
            checksum) and act on skipped non-finite steps; None: only at the first step. 1
            checks every step (a debug setting: one host synchronisation per step).
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
        check_every: Optional[int] = 100,
    ) -> None:
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
        self.check_every = check_every
        # skipped steps on the device: (total, current run, longest run since the last check)
        self._skips: Optional[torch.Tensor] = None
        self._skipped_seen = 0
        self._adamw_calls = 0
        self._fsdp1_registry: dict = {}
        # key -> matrix set; one, or one per flat partition under ZeRO (DeepSpeed steps each
        # param group's partition in a separate step() call).
        self._sets: dict[tuple, MatrixSet] = {}
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
        self._sets.clear()

    def _validate_group(self, group: dict) -> None:
        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
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

    def _matrix_params(self) -> list[MatrixEntry]:
        """The matrices of every HTMuon group, in order (a ZeRO flat partition holds several)."""
        out = []
        for g_index, group in enumerate(self.param_groups):
            if not group["htmuon"]:
                continue
            members = self._zero_members(group)
            if members is not None:  # one flat partition holding several matrices
                out.extend(MatrixEntry(group["params"][0], group, name, p) for p, name in members)
                continue
            names = group.get("param_names")
            for j, p in enumerate(group["params"]):
                name = names[j] if names else f"param_groups[{g_index}].params[{j}]"
                out.append(MatrixEntry(p, group, name, None))
        return out

    def _spec(self, group: dict) -> SpectralSpec:
        return SpectralSpec(power=float(group["power"]), method=group["method"], rtol=group["rtol"])

    def _matrix_set(self, matrices: list[MatrixEntry]) -> MatrixSet:
        """The matrix set of these matrices, built at its first step (collective: layouts,
        plan): Accelerate swaps parameters after construction, and under ZeRO each flat
        partition is its own set."""
        key = tuple((id(e.param), e.name, id(e.origin)) for e in matrices) + tuple(
            (e.group["power"], e.group["method"], e.group["rtol"], e.group["normuon"],
             e.group["stack_dims"], e.group["row_blocks"]) for e in matrices
        )
        found = self._sets.get(key)
        if found is not None:
            return found
        described = describe_params([e.param for e in matrices], [e.name for e in matrices],
                                    self._fsdp1_registry, self.process_group,
                                    zero_origins=[e.origin for e in matrices])
        matrices, placements = self._windows(matrices, described.placements, described.group)
        engine = ExchangeEngine(
            shapes=[pl.shape for pl in placements],
            local_ranges=[pl.local_range for pl in placements],
            specs=[self._spec(e.group) for e in matrices],
            names=[e.name for e in matrices],
            group=described.group,
            comm_dtype=self.comm_dtype,
            bucket_numel=self.bucket_numel,
            domains=described.domains,
            row_state_numels=[pl.shape[0] if e.group["normuon"] else 0
                              for pl, e in zip(placements, matrices)],
        )
        mset = MatrixSet(matrices, placements, engine, described.backend)
        if described.backend != "zero":  # a new parameter set replaces the old one
            self._sets.clear()
        self._sets[key] = mset
        return mset

    def _windows(self, matrices: list[MatrixEntry], placements, group) -> tuple[list, list]:
        """Each parameter's placement cut into its matrix windows (``stack_dims``,
        ``row_blocks``): one engine matrix per expert / row block, named ``name[e].rows[a:b]``."""
        rank = dist.get_rank(group) if group is not None else 0
        out_m, out_p = [], []
        for e, placement in zip(matrices, placements):
            flat = self._fsdp1_registry.get(id(e.param))  # FSDP1 views are 1-D: the original shape
            shape = flat.shape if flat is not None else zero.logical_shape(e.origin if e.origin is not None else e.param)
            windows = matrix_windows(shape, e.group["stack_dims"], e.group["row_blocks"], e.name)
            split = split_placement(placement, windows, rank, e.name)
            multi = any(not isinstance(pl.local_range[0], int) for pl in split)
            if multi and get_method(e.group["method"]).stateful:
                raise ValueError(
                    f"{e.name}: method={e.group['method']!r} keeps state per matrix, which tensor-"
                    f"parallel pieces cannot address yet; use a stateless method (eigh, gram32, ...)"
                )
            out_m.extend(MatrixEntry(e.param, e.group, e.name + w.label, e.origin) for w in windows)
            out_p.extend(split)
        return out_m, out_p

    @property
    def matrix_sets(self) -> list[MatrixSet]:
        """The matrix sets built so far (one, or one per ZeRO flat partition)."""
        return list(self._sets.values())

    @property
    def engine(self) -> Optional[ExchangeEngine]:
        """The exchange engine (None before the first step). Under ZeRO, with one matrix set
        per flat partition, there is no single engine: use :attr:`matrix_sets`."""
        sets = self.matrix_sets
        if len(sets) > 1:
            raise RuntimeError(
                f"HTMuon has {len(sets)} matrix sets (one per DeepSpeed ZeRO flat partition); "
                f"use opt.matrix_sets[k].engine"
            )
        return sets[0].engine if sets else None

    @property
    def backend(self) -> Optional[str]:
        """The backend(s) of the matrices ("fsdp2", "zero", "replicated", ...), None before the
        first step."""
        names = sorted({s.backend for s in self._sets.values()})
        return "+".join(names) if names else None

    @property
    def comm_bytes_last_step(self) -> int:
        """Bytes this rank sent for the spectral exchange in the last step (under ZeRO: summed
        over the flat partitions, each exchanged in its own step() call)."""
        return sum(s.engine.comm_bytes_last_step for s in self._sets.values())

    def stream_error(self) -> Optional[float]:
        """The largest error estimate of the last step over the matrices of a stateful method
        (``method="stream"``): the RMS cosine between the columns of its ``U`` (0 once the
        warm-started basis is the singular basis; docs/spectral.md relates it to the error
        against the exact update). None when no matrix ran such a method in the last step.

        Collective over the exchange group(s) (call it on every rank) when some group's method
        keeps state; one host read per matrix set (call it at logging time).
        """
        if not any(g["htmuon"] and get_method(g["method"]).stateful is not None for g in self.param_groups):
            return None
        found = None
        for mset in self._sets.values():
            engine = mset.engine
            errs = list(engine.state_errors.values())
            local = torch.stack(errs).max().reshape(1) if errs else torch.full((1,), -1.0)
            if engine.world_size > 1:
                local = local.to(engine.collective_device())
                torch.distributed.all_reduce(local, op=torch.distributed.ReduceOp.MAX, group=engine.group)
            value = float(local.item())
            if value >= 0 and (found is None or value > found):
                found = value
        return found

    def memory_bound(self) -> int:
        """This rank's contract for the bytes a step allocates beyond parameters, gradients
        and optimizer state (docs/distributed.md, "Memory contract"): the largest matrix set's
        exchange peak (:meth:`ExchangeEngine.memory_bound`, from its schedule), or the
        non-finite check's and AdamW's temporaries if larger (they run before and after it).
        Valid after the first step."""
        if not self._sets and not any(not g["htmuon"] for g in self.param_groups):
            raise RuntimeError("memory_bound() needs the layouts: call it after the first step()")
        params = [e.param for e in self._matrix_params()]
        wire = self.comm_dtype
        elem = (torch.empty(0, dtype=wire).element_size() if wire is not None
                else max((p.element_size() for p in params), default=4))
        on_cuda = any(p.is_cuda for p in params)
        lanes = spectral_grouped.DEFAULT_STREAMS if on_cuda else 1
        bound = max((s.engine.memory_bound(wire_bytes=elem, lanes=lanes, method_state=s.keeps_method_state)
                     for s in self._sets.values()), default=0)
        local_params = [_local(p) for g in self.param_groups for p in g["params"]]
        largest = max((t.numel() for t in local_params), default=0)
        adamw = [_local(p) for g in self.param_groups if not g["htmuon"] for p in g["params"]]
        # AdamW holds two temporaries of its largest chunk at once (g - m or g², and denom)
        adamw_temp = 2 * max((t.numel() * t.element_size() for t in adamw), default=0)
        return max(bound, largest, adamw_temp)  # the non-finite check: one bool per element

    # -- the step ----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step; collective over the exchange group.

        Host synchronisations: none in a steady-state step. A non-finite gradient on any rank
        is agreed on inside the first exchange and the step is skipped on the device (nothing
        changes). Host reads happen only when a matrix set is built (its first step, after
        ``load_state_dict``, or when the set of matrices with gradients changes) and every
        ``check_every`` steps: rank agreement (step number, plan checksum), the skip count,
        ``nonfinite="raise"`` and ``nonfinite_patience``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        matrices = self._matrix_params()
        adamw = [(p, g) for g in self.param_groups if not g["htmuon"] for p in g["params"]
                 if p.grad is not None]
        _check_dense(matrices, adamw)
        mset = self._matrix_set(matrices) if matrices else None
        if mset is not None:
            matrices = mset.entries  # one entry per matrix window (expert, row block)
        grads = mset.local_grads() if mset is not None else []
        named = [(e.name, g) for e, g in zip(matrices, grads) if g is not None and g.numel()]
        named += [(f"adamw param {j} {tuple(p.shape)}", _local(p.grad)) for j, (p, _) in enumerate(adamw)
                  if _local(p.grad).numel()]
        local_grads = [g for _, g in named]
        flag, finite, device = _nonfinite_flag(local_grads)
        for g in grads:  # finite from here on, so that a gated (skipped) write is exact
            if g is not None:  # (AdamW's fused kernel skips by its own flag instead)
                torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
        if mset is not None:
            pattern = mset.pattern()
            check = pattern != mset.local_pattern
            if check:  # built now, or the gradients moved: agree on the step and the active set
                mset.host_step = mset.first_step_number(self.state) - 1
                mset.active = mset.engine.agree(mset.host_step + 1, mset.has_piece())
                mset.local_pattern = pattern
            mset.host_step += 1
            step_no = mset.host_step
            if not check and self._due(step_no):
                check = True
                mset.engine.agree(mset.first_step_number(self.state), mset.has_piece())
            specs = [
                _MUON_SPEC if e.group["interval"] and step_no % e.group["interval"] != 0 else self._spec(e.group)
                for e in matrices
            ]
            local_flag = flag if device is not None else torch.zeros((), device=mset.device)
            keep = mset.step(self.state, grads, specs, local_flag)
        else:
            self._adamw_calls += 1
            check = self._adamw_calls == 1 or self._due(self._adamw_calls)
            dev = device or torch.device("cpu")
            keep = 1.0 - flag.to(dev, torch.float32) if device is not None else torch.ones((), device=dev)
        self._adamw_step(adamw, keep)
        self._count(keep)
        if check:
            self._check_nonfinite([n for n, _ in named], finite)
        return loss

    def _due(self, step_no: int) -> bool:
        return self.check_every is not None and step_no % self.check_every == 0

    def _count(self, keep: torch.Tensor) -> None:
        """Device-side skip bookkeeping: total skipped, the current run and the longest run
        since the last check (float32 (3,), never read in the step)."""
        skipped = 1.0 - keep.to(torch.float32)
        if self._skips is None or self._skips.device != skipped.device:
            self._skips = torch.zeros(3, dtype=torch.float32, device=skipped.device)
        total, run, longest = self._skips.unbind()
        total.add_(skipped)
        run.mul_(skipped).add_(skipped)
        torch.maximum(longest, run, out=longest)

    def _read_skips(self) -> tuple[int, int, int]:
        """(skipped steps, current run, longest run since the last check): a host read."""
        if self._skips is None:
            return 0, 0, 0
        total, run, longest = (int(x) for x in self._skips.tolist())
        return total, run, longest

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients (read from the device when asked: a host
        synchronisation, so read it at logging time)."""
        return self._read_skips()[0]

    def _check_nonfinite(self, names: Sequence[str], finite: torch.Tensor) -> None:
        """At a check: warn about the steps skipped since the last check, and raise for
        ``nonfinite="raise"`` or when ``nonfinite_patience`` steps in a row were skipped."""
        total, run, longest = self._read_skips()
        new = total - self._skipped_seen
        self._skipped_seen = total
        if self._skips is not None:
            self._skips[2].copy_(self._skips[1])  # the longest run restarts from the current one
        if not new:
            return
        bad = [n for n, ok in zip(names, finite.tolist()) if not ok] if run else []
        where = ", ".join(bad) if bad else "on another rank, or in an earlier step"
        if self.nonfinite == "raise":
            raise FloatingPointError(
                f"HTMuon: non-finite gradient ({where}); {new} step(s) since the last check "
                f"were skipped and nothing was updated. Lower the lr, clip gradients, or pass "
                f"nonfinite='skip' to skip such steps"
            )
        if self.nonfinite_patience is not None and longest >= self.nonfinite_patience:
            raise FloatingPointError(
                f"HTMuon: {longest} steps in a row had non-finite gradients "
                f"(last: {where}); the run is diverging rather than hitting a rare spike. Lower "
                f"the lr, clip gradients, or resume from an earlier checkpoint (nonfinite_patience="
                f"{self.nonfinite_patience})"
            )
        warnings.warn(f"HTMuon: skipped a step with non-finite gradients ({where}); "
                      f"{new} since the last check")

    def _adamw_step(self, adamw, keep: torch.Tensor) -> None:
        """AdamW per param group (:func:`functional.adamw_`: torch's fused kernel where it
        exists, else chunked ``_foreach``), every write gated by ``keep`` on the device."""
        by_group: dict[int, tuple[dict, list[torch.Tensor]]] = {}
        for p, group in adamw:
            by_group.setdefault(id(group), (group, []))[1].append(p)
        for group, params in by_group.values():
            device = _local(params[0]).device
            gate = keep.to(device)
            states = []
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=device)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                states.append(state)
            steps = [s["step"] for s in states]
            torch._foreach_add_(steps, gate)
            F.adamw_(
                [_local(p) for p in params], [_local(p.grad) for p in params],
                [_local(s["exp_avg"]) for s in states], [_local(s["exp_avg_sq"]) for s in states],
                steps, lr=group["lr"], betas=group["betas"], eps=group["eps"],
                weight_decay=group["weight_decay"], keep=gate,
            )

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load, plus: the state's shapes are checked against the parameters (naming
        the parameter), NorMuon's v and the method state stay float32, step counters move to
        the parameter's device, and the matrix sets are rebuilt at the next step."""
        before = list(self.param_groups)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        names = {id(p): n for _, ps, ns in self._origins for p, n in zip(ps, ns)}
        for j, saved in enumerate(saved_ids[: len(params)]):
            st = state_dict["state"].get(saved, {})
            p = params[j]
            for key in _SHAPED_STATE:
                value = st.get(key)
                if isinstance(value, torch.Tensor) and value.numel() != p.numel():
                    name = names.get(id(p), f"parameter {j}")
                    raise ValueError(
                        f"{name}: the state {key!r} being loaded has shape {tuple(value.shape)}, "
                        f"the parameter {tuple(p.shape)}; was the checkpoint saved from another "
                        f"model or partitioning?"
                    )
        # torch casts floating state to the parameter's dtype; NorMuon's v and the method state
        # stay float32 (the same mapping from saved ids to parameters as torch's).
        kept = [
            (params[j], key, st[key])
            for j, saved in enumerate(saved_ids) if j < len(params)
            for st in [state_dict["state"].get(saved, {})] for key in _FLOAT32_STATE if key in st
        ]
        super().load_state_dict(state_dict)
        for p, key, value in kept:
            self.state[p][key] = value.detach().to(device=_local(p).device, dtype=torch.float32).clone()
        for p, st in self.state.items():
            if isinstance(st.get("step"), torch.Tensor):
                st["step"] = st["step"].to(device=_local(p).device, dtype=torch.float32)
        # torch replaces the group dicts: carry each group's originals over to its new dict.
        by_group = {id(origin[0]): origin for origin in self._origins}
        self._origins = [
            (new, by_group[id(old)][1], by_group[id(old)][2])
            for old, new in zip(before, self.param_groups) if id(old) in by_group
        ]
        self._sets.clear()  # rebuilt at the next step from the (possibly new) parameters


def _check_dense(matrices: Sequence[MatrixEntry], adamw) -> None:
    """Refuses sparse gradients before anything is touched, naming the parameter."""
    for e in matrices:
        if e.param.grad is not None and e.param.grad.is_sparse:
            raise ValueError(
                f"{e.name}: HTMuon got a sparse gradient (nn.Embedding(sparse=True)?); it needs "
                f"dense gradients: use sparse=False"
            )
    for j, (p, _) in enumerate(adamw):
        if p.grad.is_sparse:
            raise ValueError(
                f"adamw param {j} {tuple(p.shape)}: HTMuon got a sparse gradient "
                f"(nn.Embedding(sparse=True)?); it needs dense gradients: use sparse=False"
            )


def _nonfinite_flag(grads: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.device]]:
    """Whether any of ``grads`` holds a NaN/Inf, as a 0-d tensor left on the device (no host
    synchronisation here), the per-tensor "all finite" flags, and that device.

    One ``_foreach_norm(inf)`` over the list (the largest magnitude of each tensor: NaN or Inf
    exactly when the tensor holds one, and unlike the 2-norm it cannot overflow)."""
    if not grads:
        none = torch.zeros((), dtype=torch.bool)
        return none, none.reshape(1), None
    device = grads[0].device
    peaks = torch._foreach_norm(list(grads), float("inf"))
    if any(t.device != device or t.dtype != peaks[0].dtype for t in peaks):
        peaks = [t.to(device=device, dtype=torch.float32) for t in peaks]
    ok = torch.isfinite(torch.stack(peaks))
    return ~ok.all(), ok, device


def attach_fsdp1(optimizer: HTMuon, model: torch.nn.Module) -> HTMuon:
    """Tells ``optimizer`` where each FSDP1 (``use_orig_params=True``) parameter's piece lives.

    One line after wrapping: ``attach_fsdp1(opt, fsdp_model)``. Needed because FSDP1 flattens
    the original parameters into 1-D views that no longer carry their shapes.
    """
    from .distributed.backends import fsdp1

    optimizer._fsdp1_registry = fsdp1.collect(model)
    optimizer._sets.clear()  # a re-wrap moves the pieces: rebuild the plan at the next step
    return optimizer
