"""The runtime's plan and transport: a schedule built once, two slots reserved per step and reused
by its buckets (released after it unless kept), and pieces that are several ranges
(tensor-parallel column blocks, strided rows) exchanged like one-range pieces, bit for bit equal
to one process."""

from __future__ import annotations

import pytest
import torch

from multirank import run_ranks

SHAPES = [(6, 8), (5, 4), (9, 3)]


def _inputs():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(m, n, generator=gen) for m, n in SHAPES]


def _pieces(rank: int, world: int, kind: str) -> list[tuple[tuple[int, int], ...]]:
    """Per matrix, this rank's ranges of the flat matrix: ``cols`` = a block of columns (one
    range per row, as Shard(1)), ``rows`` = every world-th row (strided)."""
    out = []
    for m, n in SHAPES:
        if kind == "cols":
            chunk = -(-n // world)
            lo, hi = min(rank * chunk, n), min((rank + 1) * chunk, n)
            out.append(tuple((r * n + lo, r * n + hi) for r in range(m) if hi > lo))
        else:
            out.append(tuple((r * n, (r + 1) * n) for r in range(rank, m, world)))
    return out


def _gather_piece(x: torch.Tensor, ranges) -> torch.Tensor:
    flat = x.reshape(-1)
    return torch.cat([flat[a:b] for a, b in ranges]) if ranges else flat[:0]


def multi_range_worker(rank, world, kind):
    from htmuon_dist.distributed.engine import ExchangeEngine, SpectralSpec

    pieces = _pieces(rank, world, kind)
    engine = ExchangeEngine(SHAPES, pieces, [SpectralSpec(0.125, "eigh")] * len(SHAPES),
                            [f"m{i}" for i in range(len(SHAPES))],
                            group=torch.distributed.group.WORLD if world > 1 else None)
    xs = _inputs()
    out = engine.run([_gather_piece(x, p) for x, p in zip(xs, pieces)])
    return pieces, out


@pytest.mark.multirank
@pytest.mark.parametrize("kind,world", [("cols", 2), ("cols", 3), ("rows", 2)])
def test_multi_range_pieces_equal_one_process_bit_for_bit(kind, world):
    (_, whole), = run_ranks(multi_range_worker, 1, kind)
    for pieces, out in run_ranks(multi_range_worker, world, kind):
        for i, (ranges, got) in enumerate(zip(pieces, out)):
            if not ranges:  # an empty piece: nothing comes back
                assert got is None, (kind, world, i)
                continue
            want = _gather_piece(whole[i].reshape(SHAPES[i]), ranges)
            assert got is not None and torch.equal(got, want), (kind, world, i)


def reuse_worker(rank, world, keep):
    import torch.nn as nn

    from htmuon_dist import HTMuon

    torch.manual_seed(0)
    ws = [nn.Parameter(torch.randn(m, n)) for m, n in SHAPES]
    # a 60-element bucket cap: one matrix per bucket, so each step reuses its slots 3 times
    opt = HTMuon([{"params": ws, "htmuon": True}], process_group="auto", bucket_numel=60,
                 keep_exchange_buffers=keep)
    ptrs, schedules, held, buckets = [], [], [], []
    for step in range(3):
        for w in ws:
            w.grad = torch.randn_like(w)
        seen: set = set()
        if step:  # from the second step on, record every slot the step's buckets use
            transport = opt.engine.transport
            plain = transport.buffers

            def spy(slot, direction, wire, device, plain=plain, seen=seen):
                send, recv = plain(slot, direction, wire, device)
                seen.add((slot, transport._slots[slot].data_ptr()))
                return send, recv

            transport.buffers = spy
        opt.step()
        engine = opt.engine
        ptrs.append(sorted(seen))
        held.append(engine.transport.reserved_bytes())
        buckets.append(len(next(iter(engine._schedules.values())).buckets))
        schedules.append([id(s) for s in engine._schedules.values()])
    return ptrs, schedules, held, buckets


@pytest.mark.multirank
def test_the_schedule_is_built_once_and_the_slots_are_reused_within_a_step():
    for ptrs, schedules, held, buckets in run_ranks(reuse_worker, 2, False):
        assert buckets[0] == 3, buckets
        # each step: one gather and one scatter slot, whatever the bucket count
        assert [len({s for s, _ in p}) for p in ptrs[1:]] == [2, 2] and all(len(p) == 2 for p in ptrs[1:]), ptrs
        assert held == [0, 0, 0], held  # released after every step
        assert len(schedules[0]) == 1 and schedules[0] == schedules[1] == schedules[2], schedules


@pytest.mark.multirank
def test_kept_slots_are_the_same_buffers_every_step():
    for ptrs, schedules, held, _ in run_ranks(reuse_worker, 2, True):
        assert len(ptrs[1]) == 2 and ptrs[1] == ptrs[2], ptrs
        assert held[0] > 0 and held[0] == held[1] == held[2], held


def test_keep_exchange_buffers_must_be_a_bool():
    from htmuon_dist import HTMuon

    with pytest.raises(ValueError, match="keep_exchange_buffers must be True or False"):
        HTMuon([torch.nn.Parameter(torch.randn(4, 4))], keep_exchange_buffers="yes")


def test_partially_overlapping_multi_range_pieces_are_refused():
    from htmuon_dist.distributed.layout import piece_sources

    with pytest.raises(ValueError, match="partially overlaps"):
        piece_sources((2, 4), [((2, 4),), ((0, 8),)], owner=0, name="w")
    with pytest.raises(ValueError, match="cover 6 of 8"):
        piece_sources((2, 4), [((0, 3),), ((5, 8),)], owner=0, name="w")
