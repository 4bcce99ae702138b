"""The exchange engine: stream the matrices bucket by bucket through their owners.

One engine serves every backend: it sees only :class:`ShardLayout` ranges and this rank's
flat local pieces. Per bucket (:mod:`.planner` cuts buckets by per-rank memory and balances
owners inside each one), every rank runs the same sequence:

    prepare   momentum of this rank's pieces of the bucket, in place     (MatrixUpdate.prepare)
    gather    one packed all_to_all: each piece to its matrix's owner, written straight from
              the Nesterov blend into the send buffer in the wire dtype (MatrixUpdate.source_into)
    compute   the owner assembles its matrices whole (wire dtype) and computes U Σ^p V^T,
              same-shape matrices batched within a workspace budget
    scatter   one packed all_to_all back: every rank receives its range of each result
    apply     weight decay and the scaled update, written into the local shard (MatrixUpdate.apply)
    free      nothing of the bucket outlives it

Row state (NorMuon): a matrix with ``extra_numels[i] = k > 0`` has a float32 state of k values
(one per row) that is REPLICATED on every rank of the group. Its owner, after computing the
result, calls ``MatrixUpdate.finish(i, result) -> (result, state)``; the new state rides in the
scatter after the piece for every other rank (also ranks whose piece is empty), bit-viewed as
``ceil(4k / e)`` wire elements, so a bf16 wire carries it losslessly; every rank (the owner
too) stores it through ``MatrixUpdate.apply_extra``. With no row state nothing changes.

Method state (``stream``): a stateful method keeps ``k = state_numel(method, m, n) <= m·n``
float32 values per matrix from one step to the next. The optimizer stores them sharded like
the parameter: the first k entries of a float32 tensor shaped like it, so a rank holding the
flat range ``[s, e)`` of the matrix holds ``[min(s, k), min(e, k))`` of the state, and
checkpoints and resharding handle it as they handle the momentum. Each such part travels, as
float32 bits, right after the rank's piece: to the owner in the gather
(``MatrixUpdate.state_into``) and, updated, back in the scatter (``MatrixUpdate.apply_state``).
An update without ``state_into`` (:meth:`ExchangeEngine.run`) runs the method without state.

Pipelining keeps at most two buckets in flight: the gather of bucket k+1 runs while the
owner computes bucket k, and bucket k-1's scatter is finished before that compute starts.

The wire dtype is applied evenly: every piece the owner uses (its own included) and every
piece of the result that any rank applies (the owner's own included) is rounded to it, so
replicas (DDP, HSDP) stay bit-identical and the rank cutoff follows the wire's precision.

Bytes sent by rank r per step (``comm_bytes_last_step``), with e the wire element size,
src_r(i) the part of matrix i that r sends to its owner and R_r(i) r's piece:
    gather:  sum over i with owner(i) != r of |src_r(i)|·e
    scatter: sum over i with owner(i) == r of sum over s != r of |R_s(i)|·e
    row state (only matrices with one): + sum over i with owner(i) == r of (W - 1)·ceil(4·k_i / e)·e
    method state: + ceil(4·|part| / e)·e after each piece above, both ways

Memory: :meth:`ExchangeEngine.memory_bound` gives each rank's peak of temporaries from the
plan (docs/distributed.md, "Memory contract").
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Sequence

import torch
import torch.distributed as dist

from ..spectral import method_cost, method_workspace, spectral_power_groups, state_numel, stateful_power
from .layout import Range, ShardLayout, gather_sources, validate_ranges
from .planner import Plan, make_plan

# Temporary bytes one compute batch may use beyond its inputs and outputs; same-shape
# matrices are batched up to this (at least one matrix per batch).
DEFAULT_WORKSPACE_BYTES = 256 << 20


@dataclass(frozen=True)
class SpectralSpec:
    """What the owner computes for one matrix: ``spectral_power(M, power, method, rtol)``."""

    power: float
    method: str
    rtol: Optional[float] = None


class PlanMismatchError(RuntimeError):
    """The ranks of an exchange group disagree on the matrices, their layouts or the plan."""


class MatrixUpdate(Protocol):
    """What the engine asks of the optimizer during one step; all calls act on this rank's
    local data, with matrix indices into the engine's matrix list and global flat offsets."""

    def prepare(self, indices: Sequence[int]) -> None:
        """Updates the momentum of this rank's pieces of ``indices`` in place."""

    def source_into(self, i: int, start: int, end: int, out: torch.Tensor) -> None:
        """Writes ``[start, end)`` of matrix i's transform input (within this rank's range)
        into the flat ``out`` (wire dtype)."""

    def apply(self, items: Sequence[tuple[int, torch.Tensor]]) -> None:
        """Applies, per (i, piece), this rank's flat piece of matrix i's result."""

    def dtype(self, i: int) -> torch.dtype:
        """The dtype of matrix i's local pieces."""

    # Only for engines built with ``extra_numels`` (row state, e.g. NorMuon); an update
    # without ``finish`` (e.g. :meth:`ExchangeEngine.run`'s) exchanges no row state.
    #
    # def finish(self, i, result) -> tuple[torch.Tensor, torch.Tensor]:
    #     On matrix i's owner, after the spectral step: the final (m, n) result (rounded to
    #     the wire dtype by the engine) and the new row state, float32 (extra_numels[i],).
    #
    # def apply_extra(self, items: Sequence[tuple[int, torch.Tensor]]) -> None:
    #     On every rank: stores, per (i, state), matrix i's new row state (float32).
    #
    # Only for stateful methods (``stream``); without them the method runs without state:
    #
    # def state_into(self, i, a, b, out) -> None:
    #     Writes ``[a, b)`` of matrix i's method state (within this rank's part) into the
    #     float32 ``out``.
    #
    # def apply_state(self, items: Sequence[tuple[int, int, torch.Tensor]]) -> None:
    #     Stores, per (i, a, values), the new method state of matrix i from offset a.

    @property
    def device(self) -> torch.device:
        """Where this rank's pieces live."""


def _offsets(splits: Sequence[int]) -> list[int]:
    """Start of each rank's chunk in a packed all_to_all buffer."""
    return [0, *itertools.accumulate(splits)][:-1]


def _f32_numel(n: int, elem_bytes: int) -> int:
    """Elements of ``elem_bytes`` each that carry n float32 values bit for bit."""
    return -(-4 * n // elem_bytes)


def _f32_wire_numel(n: int, wire: torch.dtype) -> int:
    """Wire elements that carry n float32 values bit for bit."""
    return _f32_numel(n, torch.empty(0, dtype=wire).element_size())


def _put_f32(out: torch.Tensor, values: torch.Tensor) -> None:
    """Writes float32 ``values`` as raw bytes into the wire slice ``out``."""
    out.view(torch.uint8)[: 4 * values.numel()] = values.contiguous().view(torch.uint8)


def _f32_slot(out: torch.Tensor, n: int) -> Optional[torch.Tensor]:
    """The first n float32 values of the wire slice ``out`` as a float32 view, or None when
    its byte offset is not float32-aligned."""
    data = out.view(torch.uint8)[: 4 * n]
    return data.view(torch.float32) if data.storage_offset() % 4 == 0 else None


def _get_f32(raw: torch.Tensor, n: int) -> torch.Tensor:
    """The n float32 values at the start of the wire slice ``raw``: a view when its byte
    offset is float32-aligned (always on a float32 wire), else a copy."""
    data = raw.view(torch.uint8)[: 4 * n]
    if data.storage_offset() % 4:
        data = data.clone()
    return data.view(torch.float32)


def _part(k: int, rng: Range) -> Range:
    """The part ``[min(s, k), min(e, k))`` of a matrix range that holds method state."""
    return min(rng[0], k), min(rng[1], k)


def _rank_and_world(group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


@dataclass
class _Pending:
    """An exchange in flight: its work handle, receive buffer and bookkeeping."""

    work: Any
    recv: torch.Tensor
    splits: list[int]
    bucket: tuple[int, ...]
    sent: int = 0
    extras: bool = False  # the scatter carries row state after each piece
    state: Optional[list[int]] = None  # per matrix, the method-state values riding along


class ExchangeEngine:
    """Owns the plan for a fixed list of matrices and streams them through their owners.

    Every rank constructs the engine with the same matrix list (same order, shapes, specs) and
    its own local ranges; construction is collective (one ``all_gather_object``) and raises
    :class:`PlanMismatchError` on every rank if they disagree.

    Args:
        shapes: global 2-D shape of each matrix.
        local_ranges: this rank's ``[start, end)`` of each flattened matrix.
        specs: the spectral computation of each matrix (for the cost model and batching).
        names: for error messages.
        group: the process group of the ranks that share these matrices; None = one process.
        comm_dtype: dtype on the wire and of the owner's whole matrices (None = the pieces'
            dtype; torch.bfloat16 halves traffic and owner memory).
        bucket_numel: per-rank cap on owned + local elements per bucket (None = twice the
            largest matrix, see :func:`~htmuon_dist.distributed.planner.default_bucket_numel`).
        domains: per rank of ``group``, a locality domain (e.g. HSDP replica group / node);
            owners gather from their own domain first. None = one domain.
        workspace_bytes: temporary memory one compute batch may use.
        extra_numels: per matrix, the float32 values of its replicated row state that the
            owner sends to every other rank with the result (0 = none; None = no matrix has
            one). NorMuon: the number of rows.
        wire_orders: per matrix, None, or its flat ranges in the order the ranks' pieces
            follow one another (tensor parallel pieces made single ranges, see
            :mod:`.windowed`): ``local_ranges`` then index that order, and the owner restores
            the natural order before computing and the wire order after. The same on every rank.
    """

    def __init__(
        self,
        shapes: Sequence[tuple[int, int]],
        local_ranges: Sequence[Range],
        specs: Sequence[SpectralSpec],
        names: Sequence[str],
        group: Optional[dist.ProcessGroup] = None,
        comm_dtype: Optional[torch.dtype] = None,
        bucket_numel: Optional[int] = None,
        domains: Optional[Sequence[int]] = None,
        workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
        extra_numels: Optional[Sequence[int]] = None,
        wire_orders: Optional[Sequence[Optional[Sequence[Range]]]] = None,
    ) -> None:
        self.group = group
        self.rank, self.world_size = _rank_and_world(group)
        self.names = list(names)
        self.shapes = [tuple(int(d) for d in s) for s in shapes]
        self.specs = list(specs)
        self.comm_dtype = comm_dtype
        self.workspace_bytes = int(workspace_bytes)
        self.domains = list(domains) if domains is not None else None
        self.extra_numels: Optional[list[int]] = None
        if extra_numels is not None and any(int(k) for k in extra_numels):
            if len(extra_numels) != len(self.shapes) or any(int(k) < 0 for k in extra_numels):
                raise ValueError(f"extra_numels must hold one count >= 0 per matrix, got {list(extra_numels)}")
            self.extra_numels = [int(k) for k in extra_numels]
        self.wire_orders: list[Optional[tuple[Range, ...]]] = (
            [tuple(o) if o is not None else None for o in wire_orders] if wire_orders is not None
            else [None] * len(self.shapes))
        self._natural_index: dict[int, torch.Tensor] = {}  # owner-side, built on first use
        all_ranges = self._agree(list(local_ranges))
        self.layouts: list[ShardLayout] = []
        for i, name in enumerate(self.names):
            ranges = tuple(tuple(r[i]) for r in all_ranges)
            validate_ranges(self.shapes[i], ranges, name)
            self.layouts.append(ShardLayout(shape=self.shapes[i], ranges=ranges))  # type: ignore[arg-type]
        # Every rank plans from the same gathered ranges, so the plans agree; _check_plan confirms.
        costs = [method_cost(spec.method, m, n) for spec, (m, n) in zip(specs, self.shapes)]
        held = [[l.size_on(r) for r in range(self.world_size)] for l in self.layouts]
        self.plan: Plan = make_plan(self.shapes, costs, self.world_size, bucket_numel, held)
        self._check_plan()
        self.sources: list[tuple[Range, ...]] = [
            gather_sources(l, self.plan.owners[i], self.names[i], self.domains)
            for i, l in enumerate(self.layouts)
        ]
        self.comm_bytes_last_step = 0
        self.comm_bytes_total = 0
        # on the owner, the last step's error estimate of each stateful method's matrix (0-d
        # float32, left on the device)
        self.state_errors: dict[int, torch.Tensor] = {}

    # -- set-up -------------------------------------------------------------------------

    def _agree(self, local_ranges: list[Range]) -> list[list[Range]]:
        """All-gathers every rank's ranges and checks that all ranks have the same matrices."""
        key: tuple = (self.shapes, self.specs, self.world_size, self.domains)
        if self.extra_numels is not None:  # ranks that disagree on row state would mis-split
            key += (self.extra_numels,)
        if any(o is not None for o in self.wire_orders):
            key += (self.wire_orders,)
        digest = hashlib.sha1(repr(key).encode()).hexdigest()[:16]
        if self.world_size == 1:
            return [local_ranges]
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, (digest, len(local_ranges), local_ranges), group=self.group)
        digests = {g[0] for g in gathered}
        if len(digests) != 1:
            detail = ", ".join(f"rank {r}: {g[0]} ({g[1]} matrices)" for r, g in enumerate(gathered))
            raise PlanMismatchError(
                "HTMuon ranks disagree on the matrix list or its settings (" + detail + "); every "
                "rank must build the optimizer with the same parameters, shapes and settings"
            )
        return [list(g[2]) for g in gathered]

    def _check_plan(self) -> None:
        """Compares plan digests once: catches nondeterminism (e.g. differing library versions
        computing different costs) before it turns into mismatched collectives."""
        if self.world_size == 1:
            return
        digests: list = [None] * self.world_size
        dist.all_gather_object(digests, self.plan.checksum(), group=self.group)
        if len(set(digests)) != 1:
            raise PlanMismatchError(
                f"HTMuon ranks computed different owner plans {digests} from the same inputs; "
                f"check that every rank runs the same htmuon-dist and torch versions"
            )

    # -- per step -------------------------------------------------------------------------

    def sync_step(
        self, step: int, nonfinite: "torch.Tensor | bool", has_piece: Sequence[bool],
        device: Optional[torch.device] = None,
    ) -> tuple[bool, list[bool]]:
        """The step's one host synchronisation: one small collective checks that the ranks
        are at the same step, and agrees on whether any rank saw a non-finite gradient and
        which matrices take part.

        Args:
            step: the step about to run (host integer).
            nonfinite: this rank's flag; a device tensor stays on the device until the
                collective, so the flags of many tensors cost no extra synchronisation.
            has_piece: per matrix, whether this rank has a gradient piece for it.
            device: where ``nonfinite`` lives (default: the collective's device).

        Returns:
            (any rank non-finite, per matrix: some rank has a gradient for it).
        """
        coll = self.collective_device() if self.world_size > 1 else (device or torch.device("cpu"))
        head = torch.tensor([step, *map(int, has_piece)], dtype=torch.int64)
        flag = torch.as_tensor(nonfinite).reshape(1).to(device=coll, dtype=torch.int64)
        local = torch.cat([head.to(coll, non_blocking=True), flag])
        if self.world_size == 1:
            table = local.unsqueeze(0).tolist()  # the step's one host synchronisation
        else:
            gathered = [torch.empty_like(local) for _ in range(self.world_size)]
            dist.all_gather(gathered, local, group=self.group)
            table = torch.stack(gathered).tolist()  # the step's one host synchronisation
        steps = [row[0] for row in table]
        if len(set(steps)) != 1:
            raise PlanMismatchError(
                f"HTMuon ranks are at different steps {steps} (rank: step); a rank skipped or "
                f"repeated optimizer.step(); every rank must call step() the same number of times"
            )
        active = [any(row[1 + j] for row in table) for j in range(len(has_piece))]
        return any(row[-1] for row in table), active

    def collective_device(self) -> torch.device:
        """Where this engine's small collectives run (the current CUDA device under NCCL)."""
        backend = dist.get_backend(self.group)
        if backend == "nccl" and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _active_buckets(self, active: Sequence[bool]) -> list[tuple[int, ...]]:
        buckets = [tuple(i for i in b if active[i]) for b in self.plan.buckets]
        return [b for b in buckets if b]

    def _wire(self, bucket: Sequence[int], update: MatrixUpdate, exact: bool = False) -> torch.dtype:
        """The bucket's wire dtype: ``comm_dtype``, or (unset, or ``exact``) the pieces'."""
        if self.comm_dtype is not None and not exact:
            return self.comm_dtype
        dtype = update.dtype(bucket[0])
        for i in bucket[1:]:
            dtype = torch.promote_types(dtype, update.dtype(i))
        return dtype

    def step(self, update: MatrixUpdate, active: Sequence[bool],
             specs: Optional[Sequence[SpectralSpec]] = None) -> None:
        """Runs one optimizer step for the matrices, streaming bucket by bucket.

        Args:
            update: the optimizer's side (momentum, transform input, apply).
            active: per matrix, whether it takes part this step (the same on every rank, see
                :meth:`sync_step`).
            specs: per matrix, what to compute this step (default: the specs the plan was made
                for; the interval variant swaps in Muon's on most steps). Must agree across ranks.
        """
        specs = list(specs) if specs is not None else self.specs
        buckets = self._active_buckets(active)
        st = self._state_numels(specs, update)
        self.state_errors = {}
        sent = 0
        if buckets:
            update.prepare(buckets[0])
            gather = self._start_gather(buckets[0], update, self._wire(buckets[0], update), st)
            scatter: Optional[_Pending] = None
            for k, bucket in enumerate(buckets):
                wire = self._wire(bucket, update)
                batches, states, nbytes = self._finish_gather(bucket, update, specs, wire, gather, st)
                gather = None  # its buffers go now, not when the next gather replaces them
                sent += nbytes
                if scatter is not None:
                    self._finish_scatter(scatter, update)
                    scatter = None
                if k + 1 < len(buckets):
                    update.prepare(buckets[k + 1])
                    gather = self._start_gather(buckets[k + 1], update, self._wire(buckets[k + 1], update), st)
                results, new_states = self._compute(batches, specs, states)
                del batches, states
                extras = self._finish(bucket, results, update, wire)
                for i in results:
                    if self.wire_orders[i] is not None:
                        results[i] = self._to_wire(i, results[i])
                update.apply(self._own_pieces(bucket, results))
                if extras:
                    update.apply_extra(sorted(extras.items()))  # type: ignore[attr-defined]
                if new_states:
                    update.apply_state(self._own_state_parts(bucket, new_states, st))  # type: ignore[attr-defined]
                scatter, nbytes = self._start_scatter(bucket, results, wire, update.device, extras,
                                                      self._row_state_on(update), new_states, st)
                sent += nbytes
                del results, extras, new_states
            if scatter is not None:
                self._finish_scatter(scatter, update)
        self.comm_bytes_last_step = sent
        self.comm_bytes_total += sent

    def run(
        self,
        pieces: Sequence[Optional[torch.Tensor]],
        specs: Optional[Sequence[SpectralSpec]] = None,
    ) -> list[Optional[torch.Tensor]]:
        """Functional form: this rank's piece of ``spectral_power`` of every active matrix.

        Args:
            pieces: per matrix, this rank's flat piece (numel = its range length) of the
                matrix to transform, or None for matrices that sit this step out (the same on
                every rank).
            specs: as in :meth:`step`.

        Returns:
            per matrix, this rank's flat piece of the result in the wire dtype, or None where
            the input was None.
        """
        update = _PiecesUpdate(self, pieces)
        self.step(update, [p is not None for p in pieces], specs)
        return update.out

    def map_owned(
        self, pieces: Sequence[Optional[torch.Tensor]], fn: Callable[[int, torch.Tensor], Any]
    ) -> dict[int, Any]:
        """Gathers each matrix onto its owner, bucket by bucket, and calls ``fn(i, whole)``
        there (whole: (m, n) in the pieces' dtype, whatever ``comm_dtype`` is: diagnostics
        see the exact values); nothing is sent back. Collective.

        Returns:
            ``{i: fn(i, whole)}`` for the matrices this rank owns.
        """
        update = _PiecesUpdate(self, pieces)
        specs = self.specs
        out: dict[int, Any] = {}
        for bucket in self._active_buckets([p is not None for p in pieces]):
            wire = self._wire(bucket, update, exact=True)
            pending = self._start_gather(bucket, update, wire)
            batches, _, _ = self._finish_gather(bucket, update, specs, wire, pending)
            for members, batch in batches.values():
                for j, i in enumerate(members):
                    out[i] = fn(i, batch[j])
            del batches
        return out

    # -- the two exchanges ------------------------------------------------------------------

    def _all_to_all(self, send: torch.Tensor, send_splits: list[int], recv_splits: list[int],
                    bucket: tuple[int, ...]) -> _Pending:
        recv = torch.empty(sum(recv_splits), dtype=send.dtype, device=send.device)
        work = dist.all_to_all_single(recv, send, recv_splits, send_splits, group=self.group,
                                      async_op=True)
        return _Pending(work=work, recv=recv, splits=recv_splits, bucket=bucket,
                        sent=send.numel() * send.element_size())

    def _state_numels(self, specs: Sequence[SpectralSpec], update: Any) -> Optional[list[int]]:
        """Per matrix, the method-state values of this step (None: no stateful method, or an
        update that keeps no state)."""
        if not callable(getattr(update, "state_into", None)):
            return None
        st = [state_numel(spec.method, *shape) for spec, shape in zip(specs, self.shapes)]
        return st if any(st) else None

    def _with_state(self, i: int, rng: Range, wire: torch.dtype, st: Optional[list[int]]) -> int:
        """Wire elements of a piece ``rng`` of matrix i followed by its method-state part."""
        if st is None or not st[i]:
            return rng[1] - rng[0]
        a, b = _part(st[i], rng)
        return rng[1] - rng[0] + _f32_wire_numel(b - a, wire)

    def _start_gather(self, bucket, update: MatrixUpdate, wire: torch.dtype,
                      st: Optional[list[int]] = None) -> Optional[_Pending]:
        """Writes, per destination owner, this rank's source slices (each followed by its
        method-state part) into one send buffer and starts the all_to_all."""
        if self.world_size == 1:
            return None
        send_splits = [0] * self.world_size
        recv_splits = [0] * self.world_size
        for i in bucket:
            owner = self.plan.owners[i]
            if owner != self.rank:
                send_splits[owner] += self._with_state(i, self.sources[i][self.rank], wire, st)
            else:
                for src in range(self.world_size):
                    if src != self.rank:
                        recv_splits[src] += self._with_state(i, self.sources[i][src], wire, st)
        send = torch.empty(sum(send_splits), dtype=wire, device=update.device)
        offsets = _offsets(send_splits)
        for i in bucket:  # ascending index within each destination's chunk
            owner = self.plan.owners[i]
            start, end = self.sources[i][self.rank]
            if owner != self.rank and end > start:
                update.source_into(i, start, end, send[offsets[owner] : offsets[owner] + end - start])
                offsets[owner] += end - start
                if st is not None and st[i]:
                    a, b = _part(st[i], (start, end))
                    if b > a:
                        slot = _f32_slot(send[offsets[owner]:], b - a)  # straight into the buffer
                        part = slot if slot is not None else torch.empty(b - a, dtype=torch.float32, device=update.device)
                        update.state_into(i, a, b, part)  # type: ignore[attr-defined]
                        if slot is None:
                            _put_f32(send[offsets[owner]:], part)
                        offsets[owner] += _f32_wire_numel(b - a, wire)
        return self._all_to_all(send, send_splits, recv_splits, bucket)

    def _finish_gather(self, bucket, update: MatrixUpdate, specs, wire: torch.dtype,
                       pending: Optional[_Pending], st: Optional[list[int]] = None,
                       ) -> tuple[dict[tuple, tuple[list[int], torch.Tensor]], dict[tuple, torch.Tensor], int]:
        """Assembles each owned matrix whole, in the wire dtype, inside one batch tensor per
        (shape, spec): ``{key: (matrix indices, (b, m, n) tensor)}``, and the method state of
        stateful keys: ``{key: (b, k) float32}``."""
        owned = [i for i in bucket if self.plan.owners[i] == self.rank]
        members: dict[tuple, list[int]] = {}
        for i in owned:
            members.setdefault((self.shapes[i], specs[i]), []).append(i)
        batches: dict[tuple, tuple[list[int], torch.Tensor]] = {}
        states: dict[tuple, torch.Tensor] = {}
        slots: dict[int, torch.Tensor] = {}
        state_slots: dict[int, torch.Tensor] = {}
        for key, idx in members.items():
            m, n = key[0]
            batch = torch.empty(len(idx), m, n, dtype=wire, device=update.device)
            batches[key] = (idx, batch)
            k = st[idx[0]] if st is not None else 0
            if k:
                states[key] = torch.empty(len(idx), k, dtype=torch.float32, device=update.device)
            for j, i in enumerate(idx):
                slots[i] = batch[j].view(-1)
                start, end = self.layouts[i].ranges[self.rank]
                if end > start:
                    update.source_into(i, start, end, slots[i][start:end])
                if k:
                    state_slots[i] = states[key][j]
                    a, b = _part(k, (start, end))
                    if b > a:
                        update.state_into(i, a, b, state_slots[i][a:b])  # type: ignore[attr-defined]
        if pending is None:
            return batches, states, 0
        pending.work.wait()
        recv, offsets = pending.recv, _offsets(pending.splits)
        for i in owned:  # ascending index within each source's chunk, as packed by the sender
            for src in range(self.world_size):
                start, end = self.sources[i][src]
                if src != self.rank and end > start:
                    slots[i][start:end] = recv[offsets[src] : offsets[src] + end - start]
                    offsets[src] += end - start
                    if i in state_slots:
                        a, b = _part(st[i], (start, end))  # type: ignore[index]
                        if b > a:
                            state_slots[i][a:b] = _get_f32(recv[offsets[src]:], b - a)
                            offsets[src] += _f32_wire_numel(b - a, wire)
        for i in owned:
            if self.wire_orders[i] is not None:
                slots[i].copy_(self._to_natural(i, slots[i]))
        return batches, states, pending.sent

    def _index(self, i: int, device: torch.device) -> torch.Tensor:
        idx = self._natural_index.get(i)
        if idx is None or idx.device != device:
            order = self.wire_orders[i]
            idx = torch.cat([torch.arange(a, b, device=device) for a, b in order])  # type: ignore[union-attr]
            self._natural_index[i] = idx
        return idx

    def _to_natural(self, i: int, wire_flat: torch.Tensor) -> torch.Tensor:
        """Matrix i's flat values in wire order -> natural (row-major) order."""
        return torch.empty_like(wire_flat).index_copy_(0, self._index(i, wire_flat.device), wire_flat)

    def _to_wire(self, i: int, result: torch.Tensor) -> torch.Tensor:
        """Matrix i's (m, n) result -> its flat values in wire order, shaped (m, n)."""
        return result.reshape(-1).index_select(0, self._index(i, result.device)).view(result.shape)

    def _compute(self, batches: dict[tuple, tuple[list[int], torch.Tensor]], specs,
                 states: Optional[dict[tuple, torch.Tensor]] = None,
                 ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """``spectral_power`` of every owned matrix: same-shape ones batched within the
        workspace budget, the batches run by :func:`spectral_power_groups` (concurrently on
        CUDA streams, in order on CPUs); keys with method state (``states``) run in order
        with it. Returns the results, (m, n) in the wire dtype, and the new method states
        ``{i: (k,) float32}``; the methods' error estimates go to ``state_errors``."""
        jobs, members = [], []
        results: dict[int, torch.Tensor] = {}
        new_states: dict[int, torch.Tensor] = {}
        for key, (idx, batch) in batches.items():
            (m, n), spec = key
            per = max(1, int(self.workspace_bytes // max(method_workspace(spec.method, m, n), 1)))
            for a in range(0, len(idx), per):
                if states and key in states:
                    out, state, err = stateful_power(batch[a : a + per], spec.power, spec.method,
                                                     states[key][a : a + per], spec.rtol)
                    for j, i in enumerate(idx[a : a + per]):
                        results[i], new_states[i], self.state_errors[i] = out[j], state[j], err[j]
                    continue
                jobs.append((batch[a : a + per], spec.power, spec.method, spec.rtol))
                members.append(idx[a : a + per])
        batches.clear()  # the jobs hold the inputs now; each goes with its job
        outs = spectral_power_groups(jobs)
        del jobs
        results.update({i: out[j] for idx, out in zip(members, outs) for j, i in enumerate(idx)})
        return results, new_states

    def _row_state_on(self, update: Any) -> bool:
        return self.extra_numels is not None and callable(getattr(update, "finish", None))

    def _extra_wire_numel(self, i: int, wire: torch.dtype) -> int:
        """Wire elements that carry matrix i's float32 row state, bit for bit."""
        return _f32_wire_numel(self.extra_numels[i], wire) if self.extra_numels is not None else 0

    def _finish(self, bucket, results: dict[int, torch.Tensor], update: Any,
                wire: torch.dtype) -> dict[int, torch.Tensor]:
        """On the owner: ``update.finish`` of each owned matrix with row state; replaces its
        result (rounded to the wire dtype, as every rank applies it) and returns the new row
        states ``{i: float32 (k_i,)}``."""
        if not self._row_state_on(update):
            return {}
        extras: dict[int, torch.Tensor] = {}
        for i in bucket:
            if self.plan.owners[i] != self.rank or not self.extra_numels[i]:  # type: ignore[index]
                continue
            out, state = update.finish(i, results[i])
            state = state.detach().to(torch.float32).reshape(-1).contiguous()
            if state.numel() != self.extra_numels[i]:  # type: ignore[index]
                raise RuntimeError(
                    f"{self.names[i]}: finish() returned {state.numel()} row-state values, the "
                    f"engine was built for {self.extra_numels[i]}"  # type: ignore[index]
                )
            results[i] = out.to(wire)
            extras[i] = state
        return extras

    def _own_pieces(self, bucket, results: dict[int, torch.Tensor]) -> list[tuple[int, torch.Tensor]]:
        items = []
        for i in bucket:
            start, end = self.layouts[i].ranges[self.rank]
            if self.plan.owners[i] == self.rank and end > start:
                items.append((i, results[i].reshape(-1)[start:end]))
        return items

    def _own_state_parts(self, bucket, new_states: dict[int, torch.Tensor],
                         st: Optional[list[int]]) -> list[tuple[int, int, torch.Tensor]]:
        items = []
        for i, state in sorted(new_states.items()):
            a, b = _part(st[i], self.layouts[i].ranges[self.rank])  # type: ignore[index]
            if b > a:
                items.append((i, a, state[a:b]))
        return items

    def _start_scatter(self, bucket, results: dict[int, torch.Tensor], wire: torch.dtype,
                       device: torch.device, extras: Optional[dict[int, torch.Tensor]] = None,
                       row_state: bool = False, new_states: Optional[dict[int, torch.Tensor]] = None,
                       st: Optional[list[int]] = None) -> tuple[Optional[_Pending], int]:
        """Packs every other rank's range of each owned result (followed by the matrix's row
        state when it has one, then its part of the new method state) and starts the
        all_to_all."""
        if self.world_size == 1:
            return None, 0
        k = [self._extra_wire_numel(i, wire) if row_state else 0 for i in range(len(self.shapes))]
        send_splits = [0] * self.world_size
        recv_splits = [0] * self.world_size
        for i in bucket:
            owner = self.plan.owners[i]
            if owner == self.rank:
                for dst in range(self.world_size):
                    if dst != self.rank:
                        send_splits[dst] += self._with_state(i, self.layouts[i].ranges[dst], wire, st) + k[i]
            else:
                recv_splits[owner] += self._with_state(i, self.layouts[i].ranges[self.rank], wire, st) + k[i]
        send = torch.empty(sum(send_splits), dtype=wire, device=device)
        offsets = _offsets(send_splits)
        for i in bucket:
            if self.plan.owners[i] != self.rank:
                continue
            flat = results[i].reshape(-1)
            for dst in range(self.world_size):
                start, end = self.layouts[i].ranges[dst]
                if dst == self.rank:
                    continue
                if end > start:
                    send[offsets[dst] : offsets[dst] + end - start] = flat[start:end]
                    offsets[dst] += end - start
                if k[i]:  # the float32 bytes, bit for bit, whatever the wire dtype
                    _put_f32(send[offsets[dst] : offsets[dst] + k[i]], extras[i])  # type: ignore[index]
                    offsets[dst] += k[i]
                if st is not None and st[i]:
                    a, b = _part(st[i], (start, end))
                    if b > a:
                        _put_f32(send[offsets[dst]:], new_states[i][a:b])  # type: ignore[index]
                        offsets[dst] += _f32_wire_numel(b - a, wire)
        pending = self._all_to_all(send, send_splits, recv_splits, bucket)
        pending.extras = row_state
        pending.state = st
        return pending, pending.sent

    def _finish_scatter(self, pending: _Pending, update: MatrixUpdate) -> None:
        pending.work.wait()
        offsets = _offsets(pending.splits)
        items, states, parts = [], [], []
        st = pending.state
        for i in pending.bucket:
            owner = self.plan.owners[i]
            if owner == self.rank:
                continue
            size = self.layouts[i].size_on(self.rank)
            if size:
                items.append((i, pending.recv[offsets[owner] : offsets[owner] + size]))
                offsets[owner] += size
            k = self._extra_wire_numel(i, pending.recv.dtype) if pending.extras else 0
            if k:
                states.append((i, _get_f32(pending.recv[offsets[owner]:], self.extra_numels[i])))  # type: ignore[index]
                offsets[owner] += k
            if st is not None and st[i]:
                a, b = _part(st[i], self.layouts[i].ranges[self.rank])
                if b > a:
                    parts.append((i, a, _get_f32(pending.recv[offsets[owner]:], b - a)))
                    offsets[owner] += _f32_wire_numel(b - a, pending.recv.dtype)
        update.apply(items)
        if states:
            update.apply_extra(states)  # type: ignore[attr-defined]
        if parts:
            update.apply_state(parts)  # type: ignore[attr-defined]

    # -- memory contract --------------------------------------------------------------------

    def memory_bound(self, rank: Optional[int] = None, wire_bytes: int = 4, lanes: int = 1) -> int:
        """Peak bytes of the step's temporaries on ``rank`` (default: this rank), from the plan.

        With e = ``wire_bytes`` and, per bucket k on the rank: O_k owned elements (whole
        matrices), G_k gather elements (sent + received), S_k scatter elements (sent +
        received) and Wk the compute workspace of its largest batch:
            peak = max over k of  e·G_{k+1} + max(2·e·O_k + W_k,  e·O_k + e·S_k)
                              and e·S_k + e·O_{k+1} + e·G_{k+1}
        (W_k counts every matrix of a same-shape compute batch; when the wire is narrower
        than float32, the float32 product adds 4·(m·n) per matrix to W_k; with ``lanes``
        concurrent CUDA streams, W_k is ``lanes`` batches' workspace).
        With row state (``extra_numels``), S_k also counts its wire elements and W_k is at least
        the owner's ``finish`` temporaries, taken as 16·m·n + 8·m bytes (NorMuon's float32
        copies of one matrix). Method state (``stream``) counts in O_k (the owner's assembled
        state), G_k and S_k (its parts) as float32 values in wire elements. Parameters,
        gradients and optimizer state are not included.
        """
        r = self.rank if rank is None else rank
        buckets = list(self.plan.buckets)
        own, gat, sca, work = [], [], [], []

        for bucket in buckets:
            o = g = s = 0
            w = 0.0
            batch: dict[tuple, int] = {}
            for i in bucket:
                numel = self.layouts[i].numel
                m, n = self.shapes[i]
                v = _f32_numel(self.extra_numels[i], wire_bytes) if self.extra_numels else 0
                k = state_numel(self.specs[i].method, m, n)
                src = [_f32_numel(b - a, wire_bytes) for a, b in (_part(k, rng) for rng in self.sources[i])]
                dst = [_f32_numel(b - a, wire_bytes) for a, b in (_part(k, rng) for rng in self.layouts[i].ranges)]
                if self.plan.owners[i] == r:
                    o += numel + _f32_numel(k, wire_bytes)
                    g += sum(e - b + src[q] for q, (b, e) in enumerate(self.sources[i]) if q != r)
                    s += sum(self.layouts[i].size_on(q) + v + dst[q] for q in range(self.world_size) if q != r)
                    extra = 4.0 * numel if wire_bytes < 4 else 0.0
                    per = method_workspace(self.specs[i].method, m, n) + extra
                    key = (self.shapes[i], self.specs[i])
                    batch[key] = batch.get(key, 0) + 1  # _compute batches same-shape matrices
                    cap = max(1, int(self.workspace_bytes // max(per - extra, 1)))
                    w = max(w, min(batch[key], cap) * per)
                    if v:
                        s += v  # the owner's own copy of the new row state
                        w = max(w, 16.0 * numel + 8.0 * m)
                else:
                    b, e = self.sources[i][r]
                    g += e - b + src[r]
                    s += self.layouts[i].size_on(r) + v + dst[r]
            own.append(o)
            gat.append(g)
            sca.append(s)
            work.append(w)
        peak = 0.0
        for k in range(len(buckets)):
            nxt_g = gat[k + 1] if k + 1 < len(buckets) else 0
            nxt_o = own[k + 1] if k + 1 < len(buckets) else 0
            e = wire_bytes
            peak = max(peak,
                       e * nxt_g + max(2 * e * own[k] + lanes * work[k], e * own[k] + e * sca[k]),
                       e * sca[k] + e * nxt_o + e * nxt_g)
        return int(peak)


class _PiecesUpdate:
    """A :class:`MatrixUpdate` over given pieces that records the results (for :meth:`run`)."""

    def __init__(self, engine: ExchangeEngine, pieces: Sequence[Optional[torch.Tensor]]) -> None:
        self.pieces = list(pieces)
        self.out: list[Optional[torch.Tensor]] = [None] * len(self.pieces)
        self._ranges = [l.ranges[engine.rank] for l in engine.layouts]
        first = next((p for p in self.pieces if p is not None), None)
        self._device = first.device if first is not None else torch.device("cpu")

    @property
    def device(self) -> torch.device:
        return self._device

    def dtype(self, i: int) -> torch.dtype:
        return self.pieces[i].dtype  # type: ignore[union-attr]

    def prepare(self, indices: Sequence[int]) -> None:
        pass

    def source_into(self, i: int, start: int, end: int, out: torch.Tensor) -> None:
        base = self._ranges[i][0]
        out.copy_(self.pieces[i][start - base : end - base])  # type: ignore[index]

    def apply(self, items: Sequence[tuple[int, torch.Tensor]]) -> None:
        for i, piece in items:
            self.out[i] = piece.clone()
