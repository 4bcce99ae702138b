"""dtensor_ranges: each rank's flat ranges under FSDP2, FSDP2 x TP and HSDP x TP."""

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from htmuon_dist.distributed.dtensor_ranges import local_flat_ranges, window_pieces
from multirank import run_ranks
import tp_workers


def _grid(shape, mesh, placements):
    import itertools
    return {c: local_flat_ranges(shape, mesh, placements, c)
            for c in itertools.product(*(range(n) for n in mesh))}


def test_strided_shard_is_right_to_left_as_torch_documents():
    got = _grid((8, 8), (2, 2), (_StridedShard(0, split_factor=2), Shard(0)))
    assert got == {(0, 0): [(0, 16)], (0, 1): [(32, 48)], (1, 0): [(16, 32)], (1, 1): [(48, 64)]}
    plain = _grid((8, 8), (2, 2), (Shard(0), Shard(0)))
    assert plain[(0, 1)] == [(16, 32)]


def test_rowwise_piece_is_one_range_per_row_and_uneven_chunks_follow_torch_chunk():
    got = _grid((5, 3), (2, 2), (Shard(0), Shard(1)))
    assert got[(0, 0)] == [(0, 2), (3, 5), (6, 8)]
    assert got[(1, 1)] == [(11, 12), (14, 15)]
    # 3 rows over 4 ranks: chunks of 1, the last rank empty
    assert _grid((3, 2), (4,), (Shard(0),))[(3,)] == []
    assert _grid((4, 3), (2, 2), (Replicate(), Shard(1)))[(1, 0)] == [(0, 2), (3, 5), (6, 8), (9, 11)]


def test_every_element_is_held_exactly_once_per_replica():
    for mesh, pl in [((2, 2), (_StridedShard(0, split_factor=2), Shard(0))), ((2, 2), (Shard(0), Shard(1))),
                     ((3, 2), (Shard(0), Shard(1)))]:
        seen = torch.zeros(7 * 5, dtype=torch.int64)
        for ranges in _grid((7, 5), mesh, pl).values():
            for a, b in ranges:
                seen[a:b] += 1
        assert bool((seen == 1).all()), (mesh, pl)


def test_window_pieces_cut_a_rank_range_into_matrix_windows():
    assert window_pieces([(0, 2), (3, 5), (6, 8)], 3, 6) == ([(0, 2), (3, 5)], (2, 6))
    assert window_pieces([(10, 20)], 0, 10) == ([], (0, 0))
    # a window is one interval, so its parts are contiguous in the local tensor
    assert window_pieces([(0, 2), (3, 5)], 1, 3) == ([(0, 1), (2, 3)], (1, 3))
    with pytest.raises(ValueError, match="Partial|cannot be addressed"):
        from torch.distributed.tensor import Partial
        local_flat_ranges((4, 4), (2,), (Partial(),), (0,))


@pytest.mark.parametrize("dp,tp,replicas", [(2, 2, 1), (1, 2, 1), (2, 1, 1), (1, 2, 2)])
def test_ranges_select_exactly_the_local_tensor_of_real_dtensors(dp, tp, replicas):
    results = run_ranks(tp_workers.ranges_select_local, dp * tp * replicas, dp, tp, replicas)
    kinds = set()
    for rank, per_param in enumerate(results):
        for name, (placements, count, ok) in per_param.items():
            assert ok, f"rank {rank} {name} {placements}"
            kinds.add(placements)
    if tp == 2:
        assert any("_StridedShard" in k for k in kinds) and any("Shard(dim=1)" in k for k in kinds)
