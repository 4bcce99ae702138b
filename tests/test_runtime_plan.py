"""The runtime's plan and transport: a schedule built once, reserved slots reused every step,
and pieces that are several ranges (tensor-parallel column blocks, strided rows) exchanged like
one-range pieces, bit for bit equal to one process."""

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


def reuse_worker(rank, world):
    import torch.nn as nn

    from htmuon_dist import HTMuon

    torch.manual_seed(0)
    ws = [nn.Parameter(torch.randn(m, n)) for m, n in SHAPES]
    opt = HTMuon([{"params": ws, "htmuon": True}], process_group="auto")
    ptrs, schedules = [], []
    for step in range(3):
        for w in ws:
            w.grad = torch.randn_like(w)
        opt.step()
        engine = opt.engine
        slots = [s.data_ptr() for s in engine.transport._slots if s is not None]
        ptrs.append(slots)
        schedules.append([id(s) for s in engine._schedules.values()])
    return ptrs, schedules


@pytest.mark.multirank
def test_the_schedule_is_built_once_and_the_slots_are_reused():
    for ptrs, schedules in run_ranks(reuse_worker, 2):
        assert len(ptrs[0]) == 2 and ptrs[0] == ptrs[1] == ptrs[2], ptrs
        assert len(schedules[0]) == 1 and schedules[0] == schedules[1] == schedules[2], schedules


def test_partially_overlapping_multi_range_pieces_are_refused():
    from htmuon_dist.distributed.layout import piece_sources

    with pytest.raises(ValueError, match="partially overlaps"):
        piece_sources((2, 4), [((2, 4),), ((0, 8),)], owner=0, name="w")
    with pytest.raises(ValueError, match="cover 6 of 8"):
        piece_sources((2, 4), [((0, 3),), ((5, 8),)], owner=0, name="w")
