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

This module is the ``torch.optim.Optimizer`` facade: param groups, hyper-parameters, the
step's order and AdamW's state. The rest lives in small modules: argument and group checks in
:mod:`htmuon_dist.group_options`, the non-finite flag and skip counts in
:mod:`htmuon_dist.nonfinite`, the additions to ``load_state_dict`` in
:mod:`htmuon_dist.state_loading`, the arithmetic in :mod:`htmuon_dist.functional`. The matrices
of each partition form a :class:`~htmuon_dist.distributed.matrix_set.MatrixSet` (built by
:mod:`htmuon_dist.distributed.set_builder`), whose
:class:`~htmuon_dist.distributed.engine.ExchangeEngine` streams them bucket by bucket through
their owners. With one process (or DDP) the same code runs with whole matrices. DeepSpeed and
Accelerate guards are the integration layer's (:mod:`htmuon_dist.integrations`).
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch.optim import Optimizer

from . import functional as F
from . import group_options as options
from . import state_loading
from .distributed import set_builder
from .distributed.backends import zero
from .distributed.engine import ExchangeEngine
from .distributed.matrix_set import METHOD_STATE, NORMUON_STATE, MatrixEntry, MatrixSet, local as _local
from .integrations import apply_build_guards
from .nonfinite import SkipCounter, nonfinite_flag
from .spectral import get_method, grouped as spectral_grouped

# Names this module exported before the split (kept for importers).
__all__ = ["HTMuon", "attach_fsdp1", "METHOD_STATE", "NORMUON_STATE"]


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
        keep_exchange_buffers: keep the exchange's two buffer slots (each about the largest
            bucket, e.g. 125 MiB per rank for a 32000 x 1024 LM head on two ranks) allocated
            between steps. Default False: they are reserved at each step's start and freed at
            its end, so the backward pass, where a training step peaks, does not carry them.
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
        keep_exchange_buffers: bool = False,
    ) -> None:
        options.check_arguments(check_every, nonfinite, nonfinite_patience, bucket_numel, comm_dtype,
                                keep_exchange_buffers)
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
        self.keep_exchange_buffers = keep_exchange_buffers
        self._skips = SkipCounter()  # skipped steps, on the device
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
        super().__init__([g for group in groups for g in options.split_group(group)], {})
        self._guard_handles = apply_build_guards(self)

    # -- param groups ------------------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        """Adds a group, filling HTMuon or AdamW defaults and validating them (a group without
        ``"htmuon"`` is split by dimension first)."""
        if "htmuon" not in param_group:
            for sub in options.split_group(param_group):
                self.add_param_group(sub)
            return
        param_group = options.fill_defaults(param_group, self._htmuon_defaults, self._adamw_defaults)
        options.validate_group(param_group)
        params = options.param_list(param_group["params"])
        names = param_group.get("param_names") or [
            f"param_groups[{len(self.param_groups)}].params[{j}]" for j in range(len(params))
        ]
        zero.check_not_tagged(params, names)
        if param_group["htmuon"]:
            options.check_windows(param_group, params, names)
        super().add_param_group(param_group)
        self._origins.append((self.param_groups[-1], params, list(names)))
        self._sets.clear()

    @property
    def param_origins(self) -> list[tuple[dict, list[torch.Tensor], list[str]]]:
        """(group, original parameters, names) per param group: under DeepSpeed ZeRO a group's
        "params" become one flat partition, and the originals carry its metadata."""
        return list(self._origins)

    # -- distribution ------------------------------------------------------------------------

    def _matrix_params(self) -> list[MatrixEntry]:
        """The matrices of every HTMuon group, in order (a ZeRO flat partition holds several)."""
        return set_builder.matrix_entries(self.param_groups, self._origins)

    def _matrix_set(self, matrices: list[MatrixEntry]) -> MatrixSet:
        """The matrix set of these matrices, built at its first step (collective: layouts,
        plan): Accelerate swaps parameters after construction, and under ZeRO each flat
        partition is its own set."""
        key = set_builder.set_key(matrices)
        found = self._sets.get(key)
        if found is not None:
            return found
        mset = set_builder.build_matrix_set(
            matrices, fsdp1_registry=self._fsdp1_registry, process_group=self.process_group,
            comm_dtype=self.comm_dtype, bucket_numel=self.bucket_numel,
            keep_buffers=self.keep_exchange_buffers,
        )
        if mset.backend != "zero":  # a new parameter set replaces the old one
            self._sets.clear()
        self._sets[key] = mset
        return mset

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
        options.check_dense([(e.name, e.param.grad) for e in matrices]
                            + [(f"adamw param {j} {tuple(p.shape)}", p.grad) for j, (p, _) in enumerate(adamw)])
        mset = self._matrix_set(matrices) if matrices else None
        if mset is not None:
            matrices = mset.entries  # one entry per matrix window (expert, row block)
        grads = mset.local_grads() if mset is not None else []
        named = [(e.name, g) for e, g in zip(matrices, grads) if g is not None and g.numel()]
        named += [(f"adamw param {j} {tuple(p.shape)}", _local(p.grad)) for j, (p, _) in enumerate(adamw)
                  if _local(p.grad).numel()]
        local_grads = [g for _, g in named]
        flag, finite, device = nonfinite_flag(local_grads)
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
                set_builder.MUON_SPEC if e.group["interval"] and step_no % e.group["interval"] != 0
                else set_builder.spectral_spec(e.group)
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
        self._skips.count(keep)
        if check:
            self._skips.check([n for n, _ in named], finite, self.nonfinite, self.nonfinite_patience)
        return loss

    def _due(self, step_no: int) -> bool:
        return self.check_every is not None and step_no % self.check_every == 0

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients (read from the device when asked: a host
        synchronisation, so read it at logging time)."""
        return self._skips.read()[0]

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
        params = [p for g in self.param_groups for p in g["params"]]
        names = {id(p): n for _, ps, ns in self._origins for p, n in zip(ps, ns)}
        state_loading.check_shapes(state_dict, params,
                                   lambda j: names.get(id(params[j]), f"parameter {j}"))
        kept = state_loading.float32_entries(state_dict, params)
        super().load_state_dict(state_dict)
        state_loading.restore_after_load(self.state, kept)
        # torch replaces the group dicts: carry each group's originals over to its new dict.
        by_group = {id(origin[0]): origin for origin in self._origins}
        self._origins = [
            (new, by_group[id(old)][1], by_group[id(old)][2])
            for old, new in zip(before, self.param_groups) if id(old) in by_group
        ]
        self._sets.clear()  # rebuilt at the next step from the (possibly new) parameters


def attach_fsdp1(optimizer: HTMuon, model: torch.nn.Module) -> HTMuon:
    """Tells ``optimizer`` where each FSDP1 (``use_orig_params=True``) parameter's piece lives.

    One line after wrapping: ``attach_fsdp1(opt, fsdp_model)``. Needed because FSDP1 flattens
    the original parameters into 1-D views that no longer carry their shapes.
    """
    from .distributed.backends import fsdp1

    optimizer._fsdp1_registry = fsdp1.collect(model)
    optimizer._sets.clear()  # a re-wrap moves the pieces: rebuild the plan at the next step
    return optimizer
