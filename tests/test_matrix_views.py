"""matrix_windows: how a parameter splits into independent matrices (stacks, row blocks)."""

import pytest
import torch

from htmuon_dist.matrix_views import head_blocks, matrix_windows


def _tiles(windows, numel):
    covered = sorted((w.offset, w.offset + w.numel) for w in windows)
    assert covered[0][0] == 0 and covered[-1][1] == numel
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))


def test_two_d_is_one_matrix_and_four_d_keeps_the_conv_view():
    assert [(w.offset, w.rows, w.cols) for w in matrix_windows((5, 3))] == [(0, 5, 3)]
    assert [(w.offset, w.rows, w.cols) for w in matrix_windows((8, 3, 3, 3))] == [(0, 8, 27)]


def test_three_d_is_a_stack_of_expert_matrices_that_index_like_the_tensor():
    t = torch.randn(3, 5, 4)
    windows = matrix_windows(t.shape)
    assert [w.label for w in windows] == ["[0]", "[1]", "[2]"]
    flat = t.reshape(-1)
    for e, w in enumerate(windows):
        assert torch.equal(flat[w.offset:w.offset + w.numel].view(w.rows, w.cols), t[e])


def test_stack_dims_override_and_nested_stacks():
    assert [(w.rows, w.cols) for w in matrix_windows((3, 5, 4), stack_dims=0)] == [(3, 20)]
    t = torch.randn(2, 3, 4, 5)
    windows = matrix_windows(t.shape, stack_dims=2)
    assert len(windows) == 6 and windows[4].label == "[1][1]"
    w = windows[4]
    assert torch.equal(t.reshape(-1)[w.offset:w.offset + w.numel].view(4, 5), t[1, 1])


def test_row_blocks_split_every_matrix_of_a_stack_gate_apart_from_up():
    experts, inter, hidden = 3, 4, 5
    t = torch.randn(experts, 2 * inter, hidden)
    windows = matrix_windows(t.shape, row_blocks=(inter, inter))
    assert len(windows) == 2 * experts
    _tiles(windows, t.numel())
    flat = t.reshape(-1)
    for e in range(experts):
        gate, up = windows[2 * e], windows[2 * e + 1]
        assert torch.equal(flat[gate.offset:gate.offset + gate.numel].view(inter, hidden), t[e, :inter])
        assert torch.equal(flat[up.offset:up.offset + up.numel].view(inter, hidden), t[e, inter:])
    assert windows[1].label == "[0].rows[4:8]"


def test_qkv_blocks_of_unequal_sizes_and_per_head():
    q, kv, hidden = 8, 4, 6
    t = torch.randn(q + 2 * kv, hidden)
    windows = matrix_windows(t.shape, row_blocks=(q, kv, kv))
    assert [(w.offset, w.rows) for w in windows] == [(0, 8), (48, 4), (72, 4)]
    assert head_blocks(16, 4) == (4, 4, 4, 4)
    assert len(matrix_windows(t.shape, row_blocks=head_blocks(16, 2))) == 8


@pytest.mark.parametrize("bad", [(3, 3), (8, 0, 8), ()])
def test_bad_row_blocks_are_refused_naming_the_parameter(bad):
    with pytest.raises(ValueError, match="w_qkv.*row_blocks"):
        matrix_windows((16, 4), row_blocks=bad, name="w_qkv")


def test_bad_stack_dims_and_heads_are_refused():
    with pytest.raises(ValueError, match="experts.*stack_dims"):
        matrix_windows((3, 4, 5), stack_dims=2, name="experts")
    with pytest.raises(ValueError, match=">= 2-D weight"):
        matrix_windows((4,))
    with pytest.raises(ValueError, match="head_dim"):
        head_blocks(10, 4)
