"""FSDP2 x tensor parallel (and HSDP x TP) equals the single-process HTMuon: 4 gloo ranks, a
block with ColwiseParallel and RowwiseParallel linears of odd FSDP2 shards (7 and 5 rows over dp = 2), two of them
cut into row blocks that cross the TP pieces. Tolerance 1e-5 relative after 3 steps."""

from __future__ import annotations

import pytest
import torch

import tp_workers as tw
from multirank import run_ranks

pytestmark = pytest.mark.multirank
STEPS, BATCH, TOL = 3, 8, 1e-5


def _worst(got, want):
    assert set(got) == set(want)
    return max(float((got[n].double() - want[n].double()).norm() / want[n].double().norm()) for n in want)


@pytest.fixture(scope="module")
def want():
    return tw.reference(STEPS, BATCH)


@pytest.mark.parametrize("dp,tp,replicas", [(2, 2, 1), (1, 2, 1), (2, 1, 1), (1, 2, 2)])
def test_fsdp2_tp_equals_single_process(want, dp, tp, replicas):
    results = run_ranks(tw.sharded_train, dp * tp * replicas, dp, tp, replicas, STEPS, BATCH)
    for r in results:
        worst = _worst(r["params"], want)
        print(f"(dp, tp, replicas) = {(dp, tp, replicas)}: worst relative parameter error {worst:.2e}")
        assert worst <= TOL
        assert r["names"] == results[0]["names"] and r["owners"] == results[0]["owners"]
    first = results[0]
    assert "qkv.weight.rows[6:10]" in first["names"]
    if tp == 2:
        assert "Shard(dim=1)" in first["placements"]["down.weight"]
        assert "_StridedShard" in first["placements"]["up.weight"] or dp == 1
        # row-parallel pieces are one range per row; column-parallel ones one row block
        assert "down.weight" in first["multi_range"] and "up.weight" not in first["multi_range"]


def test_stateful_method_under_tp_pieces_is_refused():
    results = run_ranks(tw.sharded_train, 2, 1, 2, 1, 1, BATCH, {"method": "stream"}, expect_errors=True)
    for status, value in results:
        assert status == "error" and "down.weight" in value and "stream" in value, value
