"""Owner planning and gather-source selection, without processes."""

from __future__ import annotations

import pytest

from htmuon_dist.distributed.layout import ShardLayout, gather_sources
from htmuon_dist.distributed.planner import default_bucket_numel, make_plan

SQ = (4, 4)


def test_lpt_is_deterministic_and_balanced():
    costs = [5, 5, 4, 4, 3, 3, 2, 2, 2, 1]
    plan = make_plan([SQ] * 10, costs, 3, bucket_numel=10**6)
    assert plan == make_plan([SQ] * 10, list(costs), 3, bucket_numel=10**6)
    assert len(plan.buckets) == 1 and sorted(plan.loads) == [10.0, 10.0, 11.0]
    assert plan.owners[0] == 0 and plan.owners[1] == 1  # ties go to the lowest rank, in index order
    assert plan.balance == pytest.approx(11 / (31 / 3))
    assert plan.checksum() == make_plan([SQ] * 10, costs, 3, bucket_numel=10**6).checksum()


def test_more_ranks_than_matrices_leaves_ranks_idle_not_repeating():
    plan = make_plan([SQ, SQ], [1.0, 1.0], 4)
    assert sorted(plan.owners) == [0, 1] and plan.loads.count(0.0) == 2


def test_locality_prefers_the_rank_that_holds_most_of_a_matrix():
    costs = [1.0] * 4
    held = [[0, 16], [16, 0], [0, 16], [16, 0]]  # each matrix wholly on one rank
    assert make_plan([SQ] * 4, costs, 2, held=held).owners == (1, 0, 1, 0)
    # but not at the price of balance: all on rank 1 must not all go to rank 1
    assert make_plan([SQ] * 4, costs, 2, held=[[0, 16]] * 4).loads == (2.0, 2.0)
    # replicated (everyone holds all): plain LPT
    plain = make_plan([SQ] * 4, costs, 2).owners
    assert make_plan([SQ] * 4, costs, 2, held=[[16, 16]] * 4).owners == plain


def _bucket_memory(plan, shapes, held, rank):
    """Per bucket: elements the rank owns whole plus the elements it holds locally."""
    return [sum(held[i][rank] + (shapes[i][0] * shapes[i][1] if plan.owners[i] == rank else 0)
                for i in b) for b in plan.buckets]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_buckets_cap_every_ranks_memory_and_cover_each_matrix_once(world):
    shapes = [(64, 32), (32, 64), (16, 16), (100, 8), (8, 8), (64, 64), (5, 7), (64, 32)] * 3
    costs = [float(m * n * min(m, n)) for m, n in shapes]
    held = [[-(-m * n // world)] * world for m, n in shapes]
    cap = 3 * 64 * 64
    plan = make_plan(shapes, costs, world, bucket_numel=cap, held=held)
    assert sorted(i for b in plan.buckets for i in b) == list(range(len(shapes)))
    assert len(plan.buckets) > 1
    for rank in range(world):
        for b, mem in zip(plan.buckets, _bucket_memory(plan, shapes, held, rank)):
            assert mem <= cap or len(b) == 1, (rank, b, mem)
    # a matrix larger than the cap gets a bucket of its own instead of failing
    big = make_plan([(64, 64), (4, 4)], [2.0, 1.0], 1, bucket_numel=100)
    assert big.buckets == ((0,), (1,))


def test_owners_are_balanced_inside_every_bucket_not_only_over_the_step():
    # 12 equal matrices, 3 ranks, room for 2 owned per rank per bucket: every bucket is 2/2/2.
    shapes = [(8, 8)] * 12
    held = [[22, 21, 21]] * 12
    plan = make_plan(shapes, [1.0] * 12, 3, bucket_numel=2 * 64 + 6 * 22, held=held)
    assert len(plan.buckets) == 2
    assert all(loads == (2.0, 2.0, 2.0) for loads in plan.bucket_loads)
    assert plan.pipeline_balance == pytest.approx(1.0)
    # unequal costs: the slowest rank of each bucket stays within one matrix of the ideal
    costs = [float(c) for c in (9, 8, 7, 6, 5, 4, 3, 2, 2, 1, 1, 1)]
    plan = make_plan(shapes, costs, 3, bucket_numel=2 * 64 + 6 * 22, held=held)
    for b, loads in zip(plan.buckets, plan.bucket_loads):
        assert max(loads) - min(loads) <= max(costs[i] for i in b)


def test_default_bucket_fits_the_largest_matrix_alone():
    assert default_bucket_numel([10, 32000 * 2048, 2048 * 2048]) == 2 * 32000 * 2048
    assert default_bucket_numel([]) == 1 << 22


def test_gather_sources_disjoint_replicated_and_hsdp():
    disjoint = ShardLayout((4, 5), ((0, 8), (8, 15), (15, 20), (20, 20)))
    assert gather_sources(disjoint, 1) == ((0, 8), (8, 15), (15, 20), (20, 20))
    replicated = ShardLayout((2, 3), ((0, 6),) * 3)
    assert gather_sources(replicated, 2) == ((0, 0), (0, 0), (0, 6))
    hsdp = ShardLayout((4, 2), ((0, 4), (4, 8), (0, 4), (4, 8)))  # 2 replicas x 2 shards
    assert gather_sources(hsdp, 3) == ((0, 4), (4, 4), (0, 0), (4, 8))
    # with the replica groups known, the owner gathers from its own group only
    assert gather_sources(hsdp, 3, domains=[0, 0, 1, 1]) == ((0, 0), (4, 4), (0, 4), (4, 8))
    assert gather_sources(hsdp, 0, domains=[0, 0, 1, 1]) == ((0, 4), (4, 8), (0, 0), (4, 4))


def test_gather_sources_refuses_holes_and_partial_overlaps():
    with pytest.raises(ValueError, match="cover 6 of 8"):
        gather_sources(ShardLayout((2, 4), ((0, 3), (5, 8))), 0, "w")
    with pytest.raises(ValueError, match="partially overlaps"):
        gather_sources(ShardLayout((2, 4), ((2, 5), (0, 8))), 0, "w")
