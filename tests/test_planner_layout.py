"""Owner planning and gather-source selection, without processes."""

from __future__ import annotations

import pytest

from htmuon_dist.distributed.layout import ShardLayout, gather_sources
from htmuon_dist.distributed.planner import assign_owners, make_buckets, make_plan


def test_lpt_is_deterministic_and_balanced():
    costs = [5, 5, 4, 4, 3, 3, 2, 2, 2, 1]
    owners, loads = assign_owners(costs, 3)
    assert (owners, loads) == assign_owners(list(costs), 3)
    assert sorted(loads) == [10.0, 10.0, 11.0]
    assert owners[0] == 0 and owners[1] == 1  # ties go to the lowest rank, in index order
    plan = make_plan([(4, 4)] * 10, costs, 3)
    assert plan.balance == pytest.approx(11 / (31 / 3))
    assert plan.checksum() == make_plan([(4, 4)] * 10, costs, 3).checksum()


def test_more_ranks_than_matrices_leaves_ranks_idle_not_repeating():
    owners, loads = assign_owners([1.0, 1.0], 4)
    assert sorted(owners) == [0, 1] and loads.count(0.0) == 2


def test_locality_prefers_the_rank_that_holds_most_of_a_matrix():
    costs = [1.0] * 4
    held = [[0, 16], [16, 0], [0, 16], [16, 0]]  # each matrix wholly on one rank
    owners, _ = assign_owners(costs, 2, held)
    assert owners == (1, 0, 1, 0)
    # but not at the price of balance: all on rank 1 must not all go to rank 1
    owners, loads = assign_owners(costs, 2, [[0, 16]] * 4)
    assert loads == (2.0, 2.0)
    # replicated (everyone holds all): plain LPT
    assert assign_owners(costs, 2, [[16, 16]] * 4)[0] == assign_owners(costs, 2)[0]


def test_buckets_respect_the_element_cap_and_keep_order():
    assert make_buckets([10, 10, 10, 30, 5], 25) == ((0, 1), (2,), (3,), (4,))
    assert make_buckets([], 10) == ()


def test_gather_sources_disjoint_replicated_and_hsdp():
    disjoint = ShardLayout((4, 5), ((0, 8), (8, 15), (15, 20), (20, 20)))
    assert gather_sources(disjoint, 1) == ((0, 8), (8, 15), (15, 20), (20, 20))
    replicated = ShardLayout((2, 3), ((0, 6),) * 3)
    assert gather_sources(replicated, 2) == ((0, 0), (0, 0), (0, 6))
    hsdp = ShardLayout((4, 2), ((0, 4), (4, 8), (0, 4), (4, 8)))  # 2 replicas x 2 shards
    assert gather_sources(hsdp, 3) == ((0, 4), (4, 4), (0, 0), (4, 8))


def test_gather_sources_refuses_holes_and_partial_overlaps():
    with pytest.raises(ValueError, match="cover 6 of 8"):
        gather_sources(ShardLayout((2, 4), ((0, 3), (5, 8))), 0, "w")
    with pytest.raises(ValueError, match="partially overlaps"):
        gather_sources(ShardLayout((2, 4), ((2, 5), (0, 8))), 0, "w")
