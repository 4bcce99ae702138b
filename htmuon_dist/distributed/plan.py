"""The schedule: every bucket's exchange, computed once from the layouts and the owner plan.

A step of the exchange is the same on every step as long as the matrices, their owners, the
set of channels and the wire element size are the same, so all of it is tabulated here once
and the runtime (:mod:`.engine`) only walks the tables:

- per bucket and direction (gather: pieces to the owner; scatter: results back), the
  all_to_all send and receive splits per peer and the buffer sizes, in wire elements;
- span tables: each :class:`Span` is one contiguous run of one *channel* of one matrix, with
  its offset in this rank's local data, its offset in the owner's whole matrix, and its offset
  in the packed buffer. Channels (:class:`Channel`) are typed: the piece travels in the wire
  dtype; NorMuon's row state, a stateful method's state and the step's non-finite flag travel
  as float32 bits (``ceil(4·n / e)`` wire elements for n values, e the wire element size), so a
  bf16 wire carries them losslessly;
- the owner's own spans (its piece of each matrix it assembles, its part of each result).

A rank's piece of a matrix is a tuple of ``[start, end)`` ranges of the flattened matrix (one
range for every backend today; tensor-parallel pieces are several), stored one after the other
in the rank's flat local data. Spans never assume a piece is one range.

Non-finite agreement: the first bucket's gather carries this rank's non-finite flag to every
other rank (one float32 each way per pair), so after that gather every rank knows whether any
rank saw a NaN/Inf, without another collective. With no bucket, a flags-only exchange runs.

:func:`exchange_numbers` gives, per bucket and rank, the element counts that
:meth:`~htmuon_dist.distributed.engine.ExchangeEngine.memory_bound` prices.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional, Sequence

from .layout import Range

Piece = tuple[Range, ...]


class Channel(enum.IntEnum):
    """What a span carries."""

    PIECE = 0  # the transform input / result, in the wire dtype
    METHOD_STATE = 1  # a stateful method's state part, float32 bits
    ROW_STATE = 2  # NorMuon's replicated row state (scatter only), float32 bits
    FLAG = 3  # the step's non-finite flag, one float32, first bucket's gather only


def f32_wire_numel(n: int, elem_bytes: int) -> int:
    """Wire elements of ``elem_bytes`` each that carry n float32 values bit for bit."""
    return -(-4 * n // elem_bytes)


@dataclass(frozen=True)
class Span:
    """One contiguous run of one channel of one matrix inside a packed buffer.

    Attributes:
        matrix: the matrix index.
        channel: what the run carries.
        local: offset in this rank's local data of the channel (the flat piece; for row state
            and flags 0).
        glob: offset in the owner's whole matrix (flattened), or in its state.
        numel: values carried (wire dtype for PIECE, float32 otherwise).
        at: offset in the packed buffer, in wire elements.
        wire: wire elements the run occupies.
    """

    matrix: int
    channel: Channel
    local: int
    glob: int
    numel: int
    at: int
    wire: int


@dataclass(frozen=True)
class Direction:
    """One all_to_all of a bucket as seen by this rank."""

    send_splits: tuple[int, ...]
    recv_splits: tuple[int, ...]
    send: tuple[Span, ...]  # what this rank packs (``at`` into the send buffer)
    recv: tuple[Span, ...]  # what this rank unpacks (``at`` into the receive buffer)

    @property
    def send_numel(self) -> int:
        return sum(self.send_splits)

    @property
    def recv_numel(self) -> int:
        return sum(self.recv_splits)


@dataclass(frozen=True)
class BucketSchedule:
    """Everything one gather → compute → scatter round does on this rank."""

    members: tuple[int, ...]
    owned: tuple[int, ...]  # members this rank assembles and computes
    gather: Direction
    scatter: Direction
    own_source: tuple[Span, ...]  # this rank's piece of each owned matrix (local -> glob)
    own_result: tuple[Span, ...]  # this rank's piece of each owned result (glob -> local)
    carries_flags: bool = False


@dataclass(frozen=True)
class Schedule:
    """The tabulated exchange of one step for one (active set, channels, wire size)."""

    buckets: tuple[BucketSchedule, ...]
    flags: Optional[Direction]  # a flags-only exchange when no bucket is active (else None)
    gather_slot: int = 0  # wire elements: the largest gather send + receive
    scatter_slot: int = 0  # wire elements: the largest scatter send + receive


def _intersect(piece: Piece, rng: Range) -> list[tuple[int, int, int]]:
    """(local offset, global start, length) of the parts of ``rng`` inside ``piece``, where
    the piece's ranges are stored one after the other in local data."""
    out = []
    local = 0
    for a, b in piece:
        lo, hi = max(a, rng[0]), min(b, rng[1])
        if hi > lo:
            out.append((local + lo - a, lo, hi - lo))
        local += b - a
    return out


def _state_part(piece: Piece, k: int) -> list[tuple[int, int, int]]:
    """(local offset, global start, length) of the method-state part of a piece: the first k
    entries of the flattened matrix hold the state."""
    return _intersect(piece, (0, k)) if k else []


def _own_spans(i: int, piece: Piece, k: int) -> list[Span]:
    """The owner's own piece of matrix ``i`` and its method-state part, which never travel:
    read into the owner's assembled matrix (gather) and written back from its result
    (scatter) with the same spans."""
    spans = [Span(i, Channel.PIECE, local, glob, n, 0, n) for local, glob, n in _intersect(piece, (0, 1 << 62))]
    spans += [Span(i, Channel.METHOD_STATE, local, glob, n, 0, n) for local, glob, n in _state_part(piece, k)]
    return spans


def _result_items(i: int, piece: Piece, rows: int, k: int, elem_bytes: int) -> list[tuple]:
    """What the scatter carries of matrix ``i`` for the rank holding ``piece``: its piece of the
    result, the row state, its method-state part; the owner sends exactly what that rank
    receives, so both sides use this one list."""
    items: list[tuple] = [(i, Channel.PIECE, local, glob, n, n) for local, glob, n in _intersect(piece, (0, 1 << 62))]
    if rows:
        items.append((i, Channel.ROW_STATE, 0, 0, rows, f32_wire_numel(rows, elem_bytes)))
    items += [(i, Channel.METHOD_STATE, local, glob, n, f32_wire_numel(n, elem_bytes))
              for local, glob, n in _state_part(piece, k)]
    return items


def build_schedule(
    rank: int,
    world: int,
    owners: Sequence[int],
    buckets: Sequence[Sequence[int]],
    pieces: Sequence[Sequence[Piece]],
    sources: Sequence[Sequence[Piece]],
    active: Sequence[bool],
    method_state: Sequence[int],
    row_state: Sequence[int],
    elem_bytes: int,
    flags: bool,
) -> Schedule:
    """Tabulates the exchange of one step on ``rank``.

    Args:
        owners: per matrix, its owner.
        buckets: matrix indices per bucket (the plan's order).
        pieces: ``pieces[i][r]``: rank r's piece of matrix i (ranges of the flat matrix).
        sources: ``sources[i][r]``: the ranges rank r sends to matrix i's owner.
        active: per matrix, whether it takes part (the same on every rank).
        method_state: per matrix, the float32 method-state values it carries (0 = none).
        row_state: per matrix, the float32 row-state values the owner broadcasts (0 = none).
        elem_bytes: the wire element size.
        flags: whether the step exchanges non-finite flags (world > 1).
    """
    out: list[BucketSchedule] = []
    fw = f32_wire_numel(1, elem_bytes)
    active_buckets = [tuple(i for i in b if active[i]) for b in buckets]
    active_buckets = [b for b in active_buckets if b]
    for k, bucket in enumerate(active_buckets):
        with_flags = flags and k == 0
        # gather: per peer, the flag first, then each matrix in ascending order
        send: dict[int, list] = {q: [] for q in range(world)}
        recv: dict[int, list] = {q: [] for q in range(world)}
        if with_flags:
            for q in range(world):
                if q != rank:
                    send[q].append((-1, Channel.FLAG, 0, 0, 1, fw))
                    recv[q].append((-1, Channel.FLAG, 0, 0, 1, fw))
        own_source = []
        for i in bucket:
            owner, st = owners[i], method_state[i]
            if owner != rank:
                src = sources[i][rank]
                for rng in src:
                    for local, glob, n in _intersect(pieces[i][rank], rng):
                        send[owner].append((i, Channel.PIECE, local, glob, n, n))
                for rng in src:
                    for local, glob, n in _intersect(pieces[i][rank], rng):
                        for l2, g2, n2 in _state_part(((glob, glob + n),), st):
                            send[owner].append((i, Channel.METHOD_STATE, local + l2, g2, n2,
                                                f32_wire_numel(n2, elem_bytes)))
            else:
                own_source += _own_spans(i, pieces[i][rank], st)
                for q in range(world):
                    if q == rank:
                        continue
                    for a, b in sources[i][q]:
                        if b > a:
                            recv[q].append((i, Channel.PIECE, 0, a, b - a, b - a))
                    for a, b in sources[i][q]:
                        for _, g2, n2 in _state_part(((a, b),), st):
                            recv[q].append((i, Channel.METHOD_STATE, 0, g2, n2,
                                            f32_wire_numel(n2, elem_bytes)))
        gather = _direction(world, send, recv)
        # scatter: per peer, each owned matrix: the peer's piece, its row state, its state part
        send = {q: [] for q in range(world)}
        recv = {q: [] for q in range(world)}
        own_result = []
        for i in bucket:
            owner, st, rows = owners[i], method_state[i], row_state[i]
            if owner == rank:
                own_result += _own_spans(i, pieces[i][rank], st)
                for q in range(world):
                    if q != rank:
                        send[q] += _result_items(i, pieces[i][q], rows, st, elem_bytes)
            else:
                recv[owner] += _result_items(i, pieces[i][rank], rows, st, elem_bytes)
        scatter = _direction(world, send, recv)
        out.append(BucketSchedule(
            members=bucket, owned=tuple(i for i in bucket if owners[i] == rank), gather=gather,
            scatter=scatter, own_source=tuple(own_source), own_result=tuple(own_result),
            carries_flags=with_flags,
        ))
    flag_dir = None
    if flags and not out:
        send = {q: ([(-1, Channel.FLAG, 0, 0, 1, fw)] if q != rank else []) for q in range(world)}
        flag_dir = _direction(world, send, {q: list(v) for q, v in send.items()})
    gather_slot = max([b.gather.send_numel + b.gather.recv_numel for b in out] +
                      [flag_dir.send_numel + flag_dir.recv_numel if flag_dir else 0])
    scatter_slot = max([b.scatter.send_numel + b.scatter.recv_numel for b in out], default=0)
    return Schedule(buckets=tuple(out), flags=flag_dir, gather_slot=gather_slot,
                    scatter_slot=scatter_slot)


def _direction(world: int, send: dict[int, list], recv: dict[int, list]) -> Direction:
    """Lays each peer's runs out one after the other (peer order = rank order)."""

    def lay(runs: dict[int, list]) -> tuple[tuple[int, ...], tuple[Span, ...]]:
        splits, spans, at = [], [], 0
        for q in range(world):
            start = at
            for matrix, channel, local, glob, n, wire in runs[q]:
                spans.append(Span(matrix, channel, local, glob, n, at, wire))
                at += wire
            splits.append(at - start)
        return tuple(splits), tuple(spans)

    send_splits, send_spans = lay(send)
    recv_splits, recv_spans = lay(recv)
    return Direction(send_splits, recv_splits, send_spans, recv_spans)
