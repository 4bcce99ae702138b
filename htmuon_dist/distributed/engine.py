"""The exchange runtime: walk the schedule, bucket by bucket, through the owners.

Layers (each module holds one):
    layout.py     who holds which ranges of each matrix; who sends what to an owner
    planner.py    owners and buckets (cost-balanced, memory-capped), the same on every rank
    plan.py       the schedule: per bucket the splits, span tables and buffer sizes
    transport.py  two buffer slots reserved per step, the all_to_all, float32-bit packing
    engine.py     this runtime: the pipelined loop, the owner's batched compute, memory_bound
    matrix_set.py the optimizer's side of one partition (state views, the update callbacks)

One engine serves every backend: it sees only :class:`ShardLayout` ranges and this rank's
flat local pieces. Per bucket, every rank runs the same sequence:

    gather    one packed all_to_all: each piece to its matrix's owner, written straight from
              the Nesterov blend into the reserved send buffer (MatrixUpdate.source_into)
    compute   the owner assembles its matrices whole (wire dtype) and computes U Σ^p V^T,
              same-shape matrices batched within a workspace budget
    scatter   one packed all_to_all back: every rank receives its range of each result
    apply     momentum, weight decay and the scaled update, on the local shard (MatrixUpdate.apply)

Channels (:class:`~.plan.Channel`): the piece (wire dtype); NorMuon's row state (float32, one
value per row, replicated: the owner's ``finish_rows`` result rides in the scatter to every
other rank, also ranks whose piece is empty); a stateful method's state (float32, sharded like
the parameter: the first k = state_numel(method, m, n) entries of the flat matrix, both ways);
the step's non-finite flag (float32, first bucket's gather, every pair of ranks).

Non-finite gradients, without a host synchronisation: each rank passes its flag (a 0-d device
tensor) to :meth:`ExchangeEngine.step`; after the first gather every rank holds every rank's
flag and calls ``update.agreed(found)`` with the global one (a 0-d float32 tensor, 1.0 when
some rank saw a NaN/Inf) before anything is applied, so the update can gate every write on the
device. No value is read on the host in a step.

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
    non-finite flag (optimizer steps only): + (W - 1)·ceil(4 / e)·e

Memory: :meth:`ExchangeEngine.memory_bound` gives each rank's peak of temporaries from the
same schedule (docs/distributed.md, "Memory contract").
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Sequence

import torch
import torch.distributed as dist

from ..spectral import method_workspace, method_cost, spectral_power_groups, state_numel, stateful_power
from .layout import Range, ShardLayout, piece_sources, validate_ranges
from .plan import BucketSchedule, Channel, Schedule, build_schedule, f32_wire_numel
from .planner import Plan, make_plan
from .transport import Exchange, Transport, f32_slot, get_f32, put_f32

# Temporary bytes one compute batch may use beyond its inputs and outputs; same-shape
# matrices are batched up to this (at least one matrix per batch).
DEFAULT_WORKSPACE_BYTES = 256 << 20
# Elements per chunk of a transform input computed on the fly (MatrixSet.source_into).
SOURCE_CHUNK = 1 << 16


@dataclass(frozen=True)
class SpectralSpec:
    """What the owner computes for one matrix: ``spectral_power(M, power, method, rtol)``."""

    power: float
    method: str
    rtol: Optional[float] = None


class PlanMismatchError(RuntimeError):
    """The ranks of an exchange group disagree on the matrices, their layouts or the plan."""


class MatrixUpdate(Protocol):
    """What the engine asks of its caller during one step. Every method is required; indices
    are into the engine's matrix list, offsets ``[a, b)`` are into this rank's flat local piece
    of the matrix (its ranges one after the other)."""

    device: torch.device
    keeps_method_state: bool  # the method state channel is exchanged (stateful specs)
    keeps_row_state: bool  # the row-state channel is exchanged (engine built with row state)

    def dtype(self, i: int) -> torch.dtype:
        """The dtype of matrix i's local pieces."""

    def source_into(self, i: int, a: int, b: int, out: torch.Tensor) -> None:
        """Writes local ``[a, b)`` of matrix i's transform input into ``out`` (wire dtype)."""

    def state_into(self, i: int, a: int, b: int, out: torch.Tensor) -> None:
        """Writes local ``[a, b)`` of matrix i's method state into the float32 ``out``."""

    def agreed(self, found: torch.Tensor) -> None:
        """Once per step, before any apply: 0-d float32, 1.0 when some rank saw a NaN/Inf."""

    def finish_rows(self, i: int, result: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """On matrix i's owner: the final (m, n) result and its new float32 row state."""

    def apply(self, items: Sequence[tuple[int, torch.Tensor]]) -> None:
        """Applies, per (i, piece), this rank's flat piece of matrix i's result."""

    def apply_rows(self, items: Sequence[tuple[int, torch.Tensor]]) -> None:
        """Stores, per (i, v), matrix i's new row state (every rank, the owner's bits)."""

    def apply_state(self, items: Sequence[tuple[int, int, torch.Tensor]]) -> None:
        """Stores, per (i, a, values), matrix i's new method state from local offset a."""


def _rank_and_world(group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _as_piece(rng: Any) -> tuple[Range, ...]:
    """A local range ``(s, e)`` or a tuple of ranges, as a tuple of ranges."""
    if len(rng) == 2 and all(isinstance(x, int) for x in rng):
        return ((int(rng[0]), int(rng[1])),)
    return tuple((int(a), int(b)) for a, b in rng)


class ExchangeEngine:
    """Owns the plan and the schedule for a fixed list of matrices and runs their exchange.

    Every rank constructs the engine with the same matrix list (same order, shapes, specs) and
    its own local pieces; construction is collective (two ``all_gather_object``) and raises
    :class:`PlanMismatchError` on every rank if they disagree.

    Args:
        shapes: global 2-D shape of each matrix.
        local_ranges: this rank's piece of each flattened matrix: ``(start, end)``, or a tuple
            of such ranges (stored one after the other in the local data).
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
        row_state_numels: per matrix, the float32 values of its replicated row state that the
            owner sends to every other rank with the result (0 = none). NorMuon: its rows.
        keep_buffers: keep the transport's two slots between steps (default: reserved at the
            start of each step, released at its end, see :mod:`.transport`).
    """

    def __init__(
        self,
        shapes: Sequence[tuple[int, int]],
        local_ranges: Sequence[Any],
        specs: Sequence[SpectralSpec],
        names: Sequence[str],
        group: Optional[dist.ProcessGroup] = None,
        comm_dtype: Optional[torch.dtype] = None,
        bucket_numel: Optional[int] = None,
        domains: Optional[Sequence[int]] = None,
        workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
        row_state_numels: Optional[Sequence[int]] = None,
        keep_buffers: bool = False,
    ) -> None:
        self.group = group
        self.keep_buffers = bool(keep_buffers)
        self.rank, self.world_size = _rank_and_world(group)
        self.names = list(names)
        self.shapes = [tuple(int(d) for d in s) for s in shapes]
        self.specs = list(specs)
        self.comm_dtype = comm_dtype
        self.workspace_bytes = int(workspace_bytes)
        self.domains = list(domains) if domains is not None else None
        rows = [int(k) for k in row_state_numels] if row_state_numels is not None else [0] * len(self.shapes)
        if len(rows) != len(self.shapes) or any(k < 0 for k in rows):
            raise ValueError(f"row_state_numels must hold one count >= 0 per matrix, got {rows}")
        self.row_state_numels = rows
        all_pieces = self._agree([_as_piece(r) for r in local_ranges])
        # pieces[i][r]: rank r's ranges of matrix i
        self.pieces: list[tuple[tuple[Range, ...], ...]] = [
            tuple(all_pieces[r][i] for r in range(self.world_size)) for i in range(len(self.shapes))
        ]
        self.layouts: list[ShardLayout] = []
        for i, name in enumerate(self.names):
            for piece in self.pieces[i]:
                validate_ranges(self.shapes[i], piece, name)
            ranges = tuple(p[0] if len(p) == 1 else (p[0][0], p[-1][1]) if p else (0, 0)
                           for p in self.pieces[i])
            self.layouts.append(ShardLayout(shape=self.shapes[i], ranges=ranges))  # type: ignore[arg-type]
        # Every rank plans from the same gathered pieces, so the plans agree; _check_plan confirms.
        costs = [method_cost(spec.method, m, n, spec.power) for spec, (m, n) in zip(self.specs, self.shapes)]
        held = [[sum(b - a for a, b in p) for p in self.pieces[i]] for i in range(len(self.shapes))]
        self.plan: Plan = make_plan(self.shapes, costs, self.world_size, bucket_numel, held)
        self._check_plan()
        self.source_pieces = [
            piece_sources(self.shapes[i], self.pieces[i], self.plan.owners[i], self.names[i], self.domains)
            for i in range(len(self.shapes))
        ]
        self.transport = Transport(group) if self.world_size > 1 else None
        self._schedules: dict[tuple, Schedule] = {}
        self.comm_bytes_last_step = 0
        self.comm_bytes_total = 0
        # on the owner, the last step's error estimate of each stateful method's matrix (0-d
        # float32, left on the device)
        self.state_errors: dict[int, torch.Tensor] = {}

    @property
    def sources(self) -> list[tuple[Range, ...]]:
        """Per matrix, per rank, the one range it sends to the owner (single-range pieces)."""
        out = []
        for i, per_rank in enumerate(self.source_pieces):
            row = []
            for r, ranges in enumerate(per_rank):
                if len(ranges) > 1:
                    raise ValueError(f"{self.names[i]}: rank {r} sends several ranges; use source_pieces")
                start = self.layouts[i].ranges[r][0]
                row.append(ranges[0] if ranges else (start, start))
            out.append(tuple(row))
        return out

    # -- set-up -------------------------------------------------------------------------

    def _agree(self, pieces: list[tuple[Range, ...]]) -> list[list[tuple[Range, ...]]]:
        """All-gathers every rank's pieces and checks that all ranks have the same matrices."""
        key: tuple = (self.shapes, self.specs, self.world_size, self.domains, self.row_state_numels)
        digest = hashlib.sha1(repr(key).encode()).hexdigest()[:16]
        if self.world_size == 1:
            return [pieces]
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, (digest, len(pieces), pieces), group=self.group)
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

    def agree(self, step: int, has_piece: Sequence[bool]) -> list[bool]:
        """Rank agreement, off the hot path (when a plan is built, every N steps, or on a debug
        flag): one small ``all_gather`` checks that the ranks are at the same step and hold the
        same plan, and returns, per matrix, whether some rank has a gradient for it. Collective;
        one host read."""
        digest = int(self.plan.checksum()[:12], 16)
        local = torch.tensor([int(step), digest, *map(int, has_piece)], dtype=torch.int64)
        if self.world_size == 1:
            table = [local.tolist()]
        else:
            local = local.to(self.collective_device())
            gathered = [torch.empty_like(local) for _ in range(self.world_size)]
            dist.all_gather(gathered, local, group=self.group)
            table = torch.stack(gathered).tolist()
        steps = [row[0] for row in table]
        if len(set(steps)) != 1:
            raise PlanMismatchError(
                f"HTMuon ranks are at different steps {steps} (rank: step); a rank skipped or "
                f"repeated optimizer.step(); every rank must call step() the same number of times"
            )
        if len({row[1] for row in table}) != 1:
            raise PlanMismatchError(f"HTMuon ranks hold different plans ({[row[1] for row in table]})")
        return [any(row[2 + j] for row in table) for j in range(len(has_piece))]

    def collective_device(self) -> torch.device:
        """Where this engine's small collectives run (the current CUDA device under NCCL)."""
        backend = dist.get_backend(self.group)
        if backend == "nccl" and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def schedule(self, active: Sequence[bool], method_state: Sequence[int], elem_bytes: int,
                 flags: bool, rows_on: bool = True, rank: Optional[int] = None) -> Schedule:
        """The tabulated exchange for this combination, built once and cached (on ``rank``,
        default this rank)."""
        r = self.rank if rank is None else rank
        key = (tuple(active), tuple(method_state), elem_bytes, flags and self.world_size > 1, rows_on, r)
        found = self._schedules.get(key)
        if found is None:
            found = self._schedules[key] = build_schedule(
                r, self.world_size, self.plan.owners, self.plan.buckets, self.pieces,
                self.source_pieces, active, method_state,
                self.row_state_numels if rows_on else [0] * len(self.shapes),
                elem_bytes, flags and self.world_size > 1,
            )
        return found

    def _state_numels(self, specs: Sequence[SpectralSpec], keeps: bool) -> list[int]:
        if not keeps:
            return [0] * len(self.shapes)
        return [state_numel(spec.method, *shape) for spec, shape in zip(specs, self.shapes)]

    def _wire(self, active: Sequence[bool], update: MatrixUpdate, exact: bool = False) -> torch.dtype:
        """The step's wire dtype: ``comm_dtype``, or (unset, or ``exact``) the pieces' promoted."""
        if self.comm_dtype is not None and not exact:
            return self.comm_dtype
        dtype: Optional[torch.dtype] = None
        for i, on in enumerate(active):
            if on:
                dtype = update.dtype(i) if dtype is None else torch.promote_types(dtype, update.dtype(i))
        return dtype or torch.float32

    # -- per step -------------------------------------------------------------------------

    def step(self, update: MatrixUpdate, active: Sequence[bool],
             specs: Optional[Sequence[SpectralSpec]] = None,
             nonfinite: Optional[torch.Tensor] = None) -> None:
        """Runs one optimizer step for the matrices, streaming bucket by bucket.

        Args:
            update: the caller's side (transform input, state, apply).
            active: per matrix, whether it takes part this step (the same on every rank, see
                :meth:`agree`).
            specs: per matrix, what to compute this step (default: the specs the plan was made
                for; the interval variant swaps in Muon's on most steps). Must agree across ranks.
            nonfinite: this rank's flag (0-d tensor on ``update.device``, nonzero = a NaN/Inf):
                exchanged in the first gather; ``update.agreed`` receives the global flag.
                None: no flag is exchanged and ``agreed`` receives zeros.
        """
        specs = list(specs) if specs is not None else self.specs
        st = self._state_numels(specs, update.keeps_method_state)
        wire = self._wire(active, update)
        elem = torch.empty(0, dtype=wire).element_size()
        sched = self.schedule(active, st, elem, nonfinite is not None, update.keeps_row_state)
        device = update.device
        local = (nonfinite.to(device=device, dtype=torch.float32).reshape(()) if nonfinite is not None
                 else torch.zeros((), dtype=torch.float32, device=device))
        self.state_errors = {}
        sent = 0
        buckets = sched.buckets
        if self.transport is not None:
            self.transport.reserve(sched.gather_slot, sched.scatter_slot, wire, device)
        if self.world_size == 1 or nonfinite is None:  # nothing to agree on with other ranks
            update.agreed((local != 0).to(torch.float32))
        if sched.flags is not None:  # no bucket: the flags travel alone
            assert self.transport is not None
            send, recv = self.transport.buffers(Transport.GATHER, sched.flags, wire, device)
            self._pack_flags(send, sched.flags.send, local)
            ex = self.transport.start(send, recv, sched.flags)
            ex.wait()
            sent += send.numel() * send.element_size()
            update.agreed(self._global_flag(ex, local))
        if buckets:
            gather = self._start_gather(buckets[0], update, wire, local)
            scatter: Optional[Exchange] = None
            for k, bucket in enumerate(buckets):
                batches, states, found = self._finish_gather(bucket, update, specs, wire, gather, st)
                if gather is not None:
                    sent += gather.send.numel() * gather.send.element_size()
                gather = None
                if found is not None:
                    update.agreed(found)
                if scatter is not None:
                    self._finish_scatter(scatter, update)
                    scatter = None
                if k + 1 < len(buckets):
                    gather = self._start_gather(buckets[k + 1], update, wire, local)
                results, new_states = self._compute(batches, specs, states)
                del batches, states
                rows = self._finish_rows(bucket, results, update, wire)
                update.apply(self._own_pieces(bucket, results))
                if rows:
                    update.apply_rows(sorted(rows.items()))
                if new_states:
                    update.apply_state(self._own_state_parts(bucket, new_states))
                scatter = self._start_scatter(bucket, results, rows, new_states, wire, device)
                if scatter is not None:
                    sent += scatter.send.numel() * scatter.send.element_size()
                del results, rows, new_states
            if scatter is not None:
                self._finish_scatter(scatter, update)
        self._end_of_step()
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
        update = _PiecesUpdate(pieces)
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
        update = _PiecesUpdate(pieces)
        active = [p is not None for p in pieces]
        wire = self._wire(active, update, exact=True)
        elem = torch.empty(0, dtype=wire).element_size()
        sched = self.schedule(active, [0] * len(self.shapes), elem, False, False)
        if self.transport is not None:
            self.transport.reserve(sched.gather_slot, 0, wire, update.device)
        out: dict[int, Any] = {}
        for bucket in sched.buckets:
            pending = self._start_gather(bucket, update, wire, None)
            batches, _, _ = self._finish_gather(bucket, update, self.specs, wire, pending, [0] * len(self.shapes))
            for members, batch in batches.values():
                for j, i in enumerate(members):
                    out[i] = fn(i, batch[j])
            del batches
        self._end_of_step()
        return out

    def _end_of_step(self) -> None:
        if self.transport is not None and not self.keep_buffers:
            self.transport.release()

    # -- the two exchanges ------------------------------------------------------------------

    @staticmethod
    def _pack_flags(send: torch.Tensor, spans, local: torch.Tensor) -> None:
        for span in spans:
            if span.channel is Channel.FLAG:
                put_f32(send[span.at : span.at + span.wire], local.reshape(1))

    @staticmethod
    def _global_flag(ex: Exchange, local: torch.Tensor) -> torch.Tensor:
        """1.0 when this rank's or any received flag is nonzero (0-d float32, on the device)."""
        flags = [local.reshape(1)]
        for span in ex.direction.recv:
            if span.channel is Channel.FLAG:
                flags.append(get_f32(ex.recv[span.at : span.at + span.wire], 1))
        return (torch.cat(flags) != 0).any().to(torch.float32)

    def _start_gather(self, bucket: BucketSchedule, update: MatrixUpdate, wire: torch.dtype,
                      local_flag: Optional[torch.Tensor]) -> Optional[Exchange]:
        """Writes this rank's source spans (and flags) into the gather slot and starts it."""
        if self.transport is None:
            return None
        direction = bucket.gather
        send, recv = self.transport.buffers(Transport.GATHER, direction, wire, update.device)
        for span in direction.send:
            out = send[span.at : span.at + span.wire]
            if span.channel is Channel.PIECE:
                update.source_into(span.matrix, span.local, span.local + span.numel, out)
            elif span.channel is Channel.METHOD_STATE:
                slot = f32_slot(out, span.numel)  # straight into the buffer when aligned
                part = slot if slot is not None else torch.empty(span.numel, dtype=torch.float32, device=update.device)
                update.state_into(span.matrix, span.local, span.local + span.numel, part)
                if slot is None:
                    put_f32(out, part)
            elif span.channel is Channel.FLAG:
                assert local_flag is not None
                put_f32(out, local_flag.reshape(1))
        return self.transport.start(send, recv, direction)

    def _finish_gather(self, bucket: BucketSchedule, update: MatrixUpdate, specs, wire: torch.dtype,
                       pending: Optional[Exchange], st: Sequence[int],
                       ) -> tuple[dict[tuple, tuple[list[int], torch.Tensor]], dict[tuple, torch.Tensor],
                                  Optional[torch.Tensor]]:
        """Assembles each owned matrix whole, in the wire dtype, inside one batch tensor per
        (shape, spec): ``{key: (matrix indices, (b, m, n) tensor)}``, the method state of
        stateful keys ``{key: (b, k) float32}``, and the global non-finite flag when this
        bucket carried the flags (else None)."""
        members: dict[tuple, list[int]] = {}
        for i in bucket.owned:
            members.setdefault((self.shapes[i], specs[i]), []).append(i)
        batches: dict[tuple, tuple[list[int], torch.Tensor]] = {}
        states: dict[tuple, torch.Tensor] = {}
        slots: dict[int, torch.Tensor] = {}
        state_slots: dict[int, torch.Tensor] = {}
        for key, idx in members.items():
            m, n = key[0]
            batch = torch.empty(len(idx), m, n, dtype=wire, device=update.device)
            batches[key] = (idx, batch)
            k = st[idx[0]]
            if k:
                states[key] = torch.empty(len(idx), k, dtype=torch.float32, device=update.device)
            for j, i in enumerate(idx):
                slots[i] = batch[j].view(-1)
                if k:
                    state_slots[i] = states[key][j]
        for span in bucket.own_source:
            i = span.matrix
            if span.channel is Channel.PIECE:
                update.source_into(i, span.local, span.local + span.numel,
                                   slots[i][span.glob : span.glob + span.numel])
            else:
                update.state_into(i, span.local, span.local + span.numel,
                                  state_slots[i][span.glob : span.glob + span.numel])
        if pending is None:
            return batches, states, None
        pending.wait()
        recv = pending.recv
        found = None
        for span in pending.direction.recv:
            raw = recv[span.at : span.at + span.wire]
            if span.channel is Channel.PIECE:
                slots[span.matrix][span.glob : span.glob + span.numel] = raw
            elif span.channel is Channel.METHOD_STATE:
                state_slots[span.matrix][span.glob : span.glob + span.numel] = get_f32(raw, span.numel)
        if bucket.carries_flags:
            flags = [get_f32(recv[s.at : s.at + s.wire], 1) for s in pending.direction.recv
                     if s.channel is Channel.FLAG]
            sent = [get_f32(pending.send[s.at : s.at + s.wire], 1) for s in pending.direction.send
                    if s.channel is Channel.FLAG][:1]
            found = (torch.cat(flags + sent) != 0).any().to(torch.float32)
        return batches, states, found

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

    def _finish_rows(self, bucket: BucketSchedule, results: dict[int, torch.Tensor],
                     update: MatrixUpdate, wire: torch.dtype) -> dict[int, torch.Tensor]:
        """On the owner: ``update.finish_rows`` of each owned matrix with row state; replaces
        its result (rounded to the wire dtype, as every rank applies it) and returns the new
        row states ``{i: float32 (k_i,)}``."""
        if not update.keeps_row_state:
            return {}
        rows: dict[int, torch.Tensor] = {}
        for i in bucket.owned:
            if not self.row_state_numels[i]:
                continue
            out, state = update.finish_rows(i, results[i])
            state = state.detach().to(torch.float32).reshape(-1).contiguous()
            if state.numel() != self.row_state_numels[i]:
                raise RuntimeError(
                    f"{self.names[i]}: finish_rows() returned {state.numel()} row-state values, "
                    f"the engine was built for {self.row_state_numels[i]}"
                )
            results[i] = out.to(wire)
            rows[i] = state
        return rows

    def _own_pieces(self, bucket: BucketSchedule, results: dict[int, torch.Tensor]) -> list[tuple[int, torch.Tensor]]:
        parts: dict[int, list[torch.Tensor]] = {}
        for span in bucket.own_result:
            if span.channel is Channel.PIECE:
                parts.setdefault(span.matrix, []).append(
                    results[span.matrix].reshape(-1)[span.glob : span.glob + span.numel])
        return [(i, p[0] if len(p) == 1 else torch.cat(p)) for i, p in parts.items()]

    def _own_state_parts(self, bucket: BucketSchedule,
                         new_states: dict[int, torch.Tensor]) -> list[tuple[int, int, torch.Tensor]]:
        return [(s.matrix, s.local, new_states[s.matrix][s.glob : s.glob + s.numel])
                for s in bucket.own_result if s.channel is Channel.METHOD_STATE and s.matrix in new_states]

    def _start_scatter(self, bucket: BucketSchedule, results: dict[int, torch.Tensor],
                       rows: dict[int, torch.Tensor], new_states: dict[int, torch.Tensor],
                       wire: torch.dtype, device: torch.device) -> Optional[Exchange]:
        """Packs every other rank's part of each owned result (its piece, the row state, its
        method-state part) into the scatter slot and starts the all_to_all."""
        if self.transport is None:
            return None
        direction = bucket.scatter
        send, recv = self.transport.buffers(Transport.SCATTER, direction, wire, device)
        for span in direction.send:
            out = send[span.at : span.at + span.wire]
            if span.channel is Channel.PIECE:
                out.copy_(results[span.matrix].reshape(-1)[span.glob : span.glob + span.numel])
            elif span.channel is Channel.ROW_STATE:
                put_f32(out, rows[span.matrix])
            else:
                put_f32(out, new_states[span.matrix][span.glob : span.glob + span.numel])
        return self.transport.start(send, recv, direction)

    def _finish_scatter(self, pending: Exchange, update: MatrixUpdate) -> None:
        pending.wait()
        recv = pending.recv
        pieces: dict[int, list[torch.Tensor]] = {}
        rows, parts = [], []
        for span in pending.direction.recv:
            raw = recv[span.at : span.at + span.wire]
            if span.channel is Channel.PIECE:
                pieces.setdefault(span.matrix, []).append(raw)
            elif span.channel is Channel.ROW_STATE:
                rows.append((span.matrix, get_f32(raw, span.numel)))
            else:
                parts.append((span.matrix, span.local, get_f32(raw, span.numel)))
        # a rank's ranges of one matrix arrive one after the other: one contiguous piece
        update.apply([(i, p[0] if len(p) == 1 else torch.cat(p)) for i, p in pieces.items()])
        if rows:
            update.apply_rows(rows)
        if parts:
            update.apply_state(parts)

    # -- memory contract --------------------------------------------------------------------

    def memory_bound(self, rank: Optional[int] = None, wire_bytes: int = 4, lanes: int = 1,
                     method_state: bool = True) -> int:
        """Peak bytes of the step's temporaries on ``rank`` (default: this rank), from the
        same schedule the step runs.

        With e = ``wire_bytes``, per bucket k on the rank O_k owned elements (whole matrices,
        plus their method state as float32 in wire elements) and W_k the compute workspace of
        its largest batch, and the two reserved slots G = max_k (gather send + receive) and
        S = max_k (scatter send + receive) in wire elements:
            peak = e·(G + S) + max over k of (2·e·O_k + W_k) + 4·SOURCE_CHUNK
        (W_k counts every matrix of a same-shape compute batch; when the wire is narrower
        than float32, the float32 product adds 4·(m·n) per matrix to W_k; with ``lanes``
        concurrent CUDA streams, W_k is ``lanes`` batches' workspace; with row state, W_k is at
        least the owner's ``finish_rows`` temporaries, 16·m·n + 8·m bytes; the last term is the
        chunk of a Nesterov input computed on the fly). The slots are reserved for the step and
        released after it (kept with ``keep_buffers``). Parameters, gradients and optimizer state
        are not included.
        """
        r = self.rank if rank is None else rank
        active = [True] * len(self.shapes)
        st = self._state_numels(self.specs, method_state)
        sched = self.schedule(active, st, wire_bytes, self.world_size > 1, True, rank=r)
        peak_bucket = 0.0
        for bucket in sched.buckets:
            o = 0
            w = 0.0
            batch: dict[tuple, int] = {}
            for i in bucket.owned:
                m, n = self.shapes[i]
                numel = m * n
                o += numel + f32_wire_numel(st[i], wire_bytes)
                extra = 4.0 * numel if wire_bytes < 4 else 0.0
                per = method_workspace(self.specs[i].method, m, n) + extra
                key = (self.shapes[i], self.specs[i])
                batch[key] = batch.get(key, 0) + 1  # _compute batches same-shape matrices
                cap = max(1, int(self.workspace_bytes // max(per - extra, 1)))
                w = max(w, min(batch[key], cap) * per)
                if self.row_state_numels[i]:
                    w = max(w, 16.0 * numel + 8.0 * m)
            peak_bucket = max(peak_bucket, 2 * wire_bytes * o + lanes * w)
        slots = wire_bytes * (sched.gather_slot + sched.scatter_slot) + 2 * 16
        return int(slots + peak_bucket + 4 * SOURCE_CHUNK)


class _PiecesUpdate:
    """A :class:`MatrixUpdate` over given pieces that records the results (for :meth:`run`)."""

    keeps_method_state = False
    keeps_row_state = False

    def __init__(self, pieces: Sequence[Optional[torch.Tensor]]) -> None:
        self.pieces = list(pieces)
        self.out: list[Optional[torch.Tensor]] = [None] * len(self.pieces)
        first = next((p for p in self.pieces if p is not None), None)
        self.device = first.device if first is not None else torch.device("cpu")

    def dtype(self, i: int) -> torch.dtype:
        return self.pieces[i].dtype  # type: ignore[union-attr]

    def source_into(self, i: int, a: int, b: int, out: torch.Tensor) -> None:
        out.copy_(self.pieces[i][a:b])  # type: ignore[index]

    def state_into(self, i: int, a: int, b: int, out: torch.Tensor) -> None:
        raise AssertionError("no method state is exchanged for run()")

    def agreed(self, found: torch.Tensor) -> None:
        pass

    def finish_rows(self, i: int, result: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise AssertionError("no row state is exchanged for run()")

    def apply(self, items: Sequence[tuple[int, torch.Tensor]]) -> None:
        for i, piece in items:
            self.out[i] = piece.clone()

    def apply_rows(self, items: Sequence[tuple[int, torch.Tensor]]) -> None:
        pass

    def apply_state(self, items: Sequence[tuple[int, int, torch.Tensor]]) -> None:
        pass
