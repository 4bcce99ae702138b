"""The exchange engine: gather each matrix onto its owner, compute ``U Σ^p V^T`` once, send
every rank back its piece of the result.

One engine serves every backend: it sees only :class:`ShardLayout` ranges and flat local
pieces. Per bucket it issues one packed ``all_to_all_single`` towards the owners and one back,
with variable split sizes (no padding). Buckets are pipelined: the gather of bucket k+1 is in
flight while the owner computes bucket k.

Bytes sent by rank r per step (``comm_bytes_last_step``), with e the communication element
size, src_r(i) the part of matrix i that r sends to its owner and R_r(i) r's piece:
    gather:  sum over i with owner(i) != r of |src_r(i)|·e
    scatter: sum over i with owner(i) == r of sum over s != r of |R_s(i)|·e
For W equal disjoint shards this is about 2·(W-1)/W² of all matrix bytes per rank, i.e.
2·(W-1)/W·total summed over ranks; for replicated matrices the gather is free and the scatter
sends each whole result to the W-1 other ranks.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from ..spectral import method_cost, spectral_power
from .layout import Range, ShardLayout, gather_sources, validate_ranges
from .planner import Plan, make_plan


@dataclass(frozen=True)
class SpectralSpec:
    """What the owner computes for one matrix: ``spectral_power(M, power, method, rtol)``."""

    power: float
    method: str
    rtol: Optional[float] = None


class PlanMismatchError(RuntimeError):
    """The ranks of an exchange group disagree on the matrices, their layouts or the plan."""


def _rank_and_world(group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class ExchangeEngine:
    """Owns the plan for a fixed list of matrices and runs the exchange each step.

    Every rank constructs the engine with the same matrix list (same order, shapes, specs) and
    its own local ranges; construction is collective (one ``all_gather_object``) and raises
    :class:`PlanMismatchError` on every rank if they disagree.

    Args:
        shapes: global 2-D shape of each matrix.
        local_ranges: this rank's ``[start, end)`` of each flattened matrix.
        specs: the spectral computation of each matrix (for the cost model and batching).
        names: for error messages.
        group: the process group of the ranks that share these matrices; None = one process.
        comm_dtype: dtype on the wire (None = the pieces' dtype; torch.bfloat16 halves traffic).
        bucket_numel: elements of whole matrices per bucket (bounds the owners' buffers).
    """

    def __init__(
        self,
        shapes: Sequence[tuple[int, int]],
        local_ranges: Sequence[Range],
        specs: Sequence[SpectralSpec],
        names: Sequence[str],
        group: Optional[dist.ProcessGroup] = None,
        comm_dtype: Optional[torch.dtype] = None,
        bucket_numel: int = 1 << 28,
    ) -> None:
        self.group = group
        self.rank, self.world_size = _rank_and_world(group)
        self.names = list(names)
        self.shapes = [tuple(int(d) for d in s) for s in shapes]
        self.specs = list(specs)
        self.comm_dtype = comm_dtype
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
            gather_sources(l, self.plan.owners[i], self.names[i]) for i, l in enumerate(self.layouts)
        ]
        self.comm_bytes_last_step = 0
        self.comm_bytes_total = 0

    # -- set-up -------------------------------------------------------------------------

    def _agree(self, local_ranges: list[Range]) -> list[list[Range]]:
        """All-gathers every rank's ranges and checks that all ranks have the same matrices."""
        digest = hashlib.sha1(repr((self.shapes, self.specs, self.world_size)).encode()).hexdigest()[:16]
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

    def sync_step(self, step: int, nonfinite: bool, has_piece: Sequence[bool]) -> tuple[bool, list[bool]]:
        """One small collective per step: checks the ranks are at the same step, and agrees on
        whether any rank saw a non-finite gradient and which matrices take part.

        Returns:
            (any rank non-finite, per matrix: some rank has a gradient for it).
        """
        if self.world_size == 1:
            return nonfinite, list(has_piece)
        device = self._device_for_collectives()
        local = torch.tensor([step, int(nonfinite), *map(int, has_piece)], dtype=torch.int64, device=device)
        gathered = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(gathered, local, group=self.group)
        table = torch.stack(gathered).cpu()
        steps = table[:, 0].tolist()
        if len(set(steps)) != 1:
            raise PlanMismatchError(
                f"HTMuon ranks are at different steps {steps} (rank: step); a rank skipped or "
                f"repeated optimizer.step(); every rank must call step() the same number of times"
            )
        return bool(table[:, 1].any()), [bool(v) for v in table[:, 2:].any(dim=0).tolist()]

    def _device_for_collectives(self) -> torch.device:
        backend = dist.get_backend(self.group)
        if backend == "nccl" and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def run(
        self,
        pieces: Sequence[Optional[torch.Tensor]],
        specs: Optional[Sequence[SpectralSpec]] = None,
    ) -> list[Optional[torch.Tensor]]:
        """Computes every active matrix's spectral power and returns this rank's pieces.

        Args:
            pieces: per matrix, this rank's flat piece (numel = its range length) of the
                matrix to transform, or None for matrices that sit this step out (the same on
                every rank, see :meth:`sync_step`).
            specs: per matrix, what to compute this step (default: the specs the plan was made
                for; the interval variant swaps in Muon's on most steps). Must agree across ranks.

        Returns:
            per matrix, this rank's flat piece of ``spectral_power(whole matrix)``, in the
            piece's dtype, or None where the input was None.
        """
        specs = list(specs) if specs is not None else self.specs
        active = [p is not None for p in pieces]
        out: list[Optional[torch.Tensor]] = [None] * len(pieces)
        sent = 0
        buckets = [tuple(i for i in b if active[i]) for b in self.plan.buckets]
        buckets = [b for b in buckets if b]
        if not buckets:
            self.comm_bytes_last_step = 0
            return out
        pending_gather = self._start_gather(buckets[0], pieces)
        pending_scatters = []
        for k, bucket in enumerate(buckets):
            wholes, nbytes = self._finish_gather(bucket, pieces, pending_gather)
            sent += nbytes
            if k + 1 < len(buckets):
                pending_gather = self._start_gather(buckets[k + 1], pieces)
            results = self._compute(wholes, specs)
            scatter = self._start_scatter(bucket, results, pieces, out)
            sent += scatter[-1]
            pending_scatters.append(scatter)
        for scatter in pending_scatters:
            self._finish_scatter(scatter, pieces, out)
        self.comm_bytes_last_step = sent
        self.comm_bytes_total += sent
        return out

    # -- the two exchanges ------------------------------------------------------------------

    def _exchange(self, send_chunks: list[list[torch.Tensor]], recv_splits: list[int], like: torch.Tensor):
        """Packs ``send_chunks[dst]`` back to back and starts one variable-split all_to_all.

        Returns (async work, receive buffer, bytes sent); ``like`` gives the device and, unless
        ``comm_dtype`` is set, the wire dtype.
        """
        wire = self.comm_dtype or like.dtype
        send_splits = [sum(c.numel() for c in chunks) for chunks in send_chunks]
        flat = [c for chunks in send_chunks for c in chunks]
        send = torch.cat(flat).to(wire) if flat else torch.empty(0, dtype=wire, device=like.device)
        recv = torch.empty(sum(recv_splits), dtype=wire, device=like.device)
        work = dist.all_to_all_single(
            recv, send, recv_splits, send_splits, group=self.group, async_op=True
        )
        return work, recv, send.numel() * send.element_size()

    def _start_gather(self, bucket, pieces):
        """Packs, per destination owner, this rank's source slices and starts the all_to_all."""
        if self.world_size == 1:
            return None
        send_chunks: list[list[torch.Tensor]] = [[] for _ in range(self.world_size)]
        recv_splits = [0] * self.world_size
        for i in bucket:
            owner = self.plan.owners[i]
            if owner != self.rank:
                start, end = self.sources[i][self.rank]
                if end > start:
                    base = self.layouts[i].ranges[self.rank][0]
                    send_chunks[owner].append(pieces[i][start - base : end - base])
            else:
                for src in range(self.world_size):
                    if src != self.rank:
                        start, end = self.sources[i][src]
                        recv_splits[src] += end - start
        work, recv, nbytes = self._exchange(send_chunks, recv_splits, pieces[bucket[0]])
        return work, recv, recv_splits, nbytes

    def _finish_gather(self, bucket, pieces, pending) -> tuple[dict[int, torch.Tensor], int]:
        """Waits for the gather and assembles each owned matrix whole (flat, compute dtype)."""
        wholes: dict[int, torch.Tensor] = {}
        owned = [i for i in bucket if self.plan.owners[i] == self.rank]
        for i in owned:
            piece = pieces[i]
            # The piece's dtype, not float32: the default rank cutoff follows the data's precision.
            whole = torch.empty(self.layouts[i].numel, dtype=piece.dtype, device=piece.device)
            start, end = self.layouts[i].ranges[self.rank]
            whole[start:end] = piece
            wholes[i] = whole
        if pending is None:
            return wholes, 0
        work, recv, recv_splits, nbytes = pending
        work.wait()
        offsets = [sum(recv_splits[:s]) for s in range(self.world_size)]
        for i in owned:  # ascending index within each source's chunk, as packed by the sender
            for src in range(self.world_size):
                if src == self.rank:
                    continue
                start, end = self.sources[i][src]
                if end > start:
                    wholes[i][start:end] = recv[offsets[src] : offsets[src] + end - start]
                    offsets[src] += end - start
        return wholes, nbytes

    def _compute(self, wholes: dict[int, torch.Tensor], specs) -> dict[int, torch.Tensor]:
        """Same-shape, same-spec matrices go through one batched spectral_power call."""
        groups: dict[tuple, list[int]] = {}
        for i in wholes:
            groups.setdefault((self.shapes[i], specs[i], wholes[i].dtype), []).append(i)
        results: dict[int, torch.Tensor] = {}
        for (shape, spec, _), members in groups.items():
            batch = torch.stack([wholes[i].view(shape) for i in members])
            out = spectral_power(batch, spec.power, spec.method, spec.rtol)
            for i, matrix in zip(members, out):
                results[i] = matrix.reshape(-1)
        return results

    def _start_scatter(self, bucket, results, pieces, out):
        """Sends every other rank its range of each owned result; keeps this rank's own."""
        for i in bucket:
            if self.plan.owners[i] == self.rank:
                start, end = self.layouts[i].ranges[self.rank]
                out[i] = results[i][start:end].to(pieces[i].dtype)
        if self.world_size == 1:
            return (None, None, None, 0)
        send_chunks: list[list[torch.Tensor]] = [[] for _ in range(self.world_size)]
        recv_splits = [0] * self.world_size
        for i in bucket:
            owner = self.plan.owners[i]
            if owner == self.rank:
                for dst in range(self.world_size):
                    start, end = self.layouts[i].ranges[dst]
                    if dst != self.rank and end > start:
                        send_chunks[dst].append(results[i][start:end])
            else:
                recv_splits[owner] += self.layouts[i].size_on(self.rank)
        work, recv, nbytes = self._exchange(send_chunks, recv_splits, pieces[bucket[0]])
        return (work, recv, (bucket, recv_splits), nbytes)

    def _finish_scatter(self, pending, pieces, out) -> None:
        work, recv, meta, _ = pending
        if work is None:
            return
        work.wait()
        bucket, recv_splits = meta
        offsets = [sum(recv_splits[:s]) for s in range(self.world_size)]
        for i in bucket:
            owner = self.plan.owners[i]
            if owner == self.rank:
                continue
            size = self.layouts[i].size_on(self.rank)
            piece = recv[offsets[owner] : offsets[owner] + size]
            offsets[owner] += size
            out[i] = piece.to(pieces[i].dtype)
