"""HTMuon under DeepSpeed ZeRO 1/2/3 equals the single-process optimizer (gloo, CPU).

DeepSpeed runs on its CPU accelerator (``DS_ACCELERATOR=cpu``) inside the gloo process group
that ``multirank.run_ranks`` sets up; the model is the tiny LLaMA with three layers so that
ZeRO-1/2's even split of each param group cuts matrices in two at W = 2 and 3 (ZeRO-3 cuts
every matrix). Tolerance: 1e-5 relative per parameter on the fp32 master weights, as in
tests/test_distributed.py (the residual is the order of the gradient sums). Checkpoints: a run
saves after step k and carries on; a fresh process group loads the checkpoint and finishes;
both must end bit-identical.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch

pytest.importorskip("deepspeed")

import ds_workers
from ds_workers import reference_run
from multirank import free_port, run_ranks
from test_distributed import OPT, assert_same_params

from htmuon_dist.integrations.deepspeed import DeepSpeedConfigError, check_config
from htmuon_dist import HTMuon

pytestmark = pytest.mark.multirank
REPO = Path(__file__).resolve().parents[1]


def _straddles(layouts) -> bool:
    """Some matrix is split inside (not only between) ranks' pieces."""
    return any(sum(1 for s, e in ranges if e > s) > 1 for _, ranges in layouts)


@pytest.mark.parametrize("stage,world,accum", [(1, 2, 2), (2, 3, 1), (3, 2, 2)])
def test_zero_equals_single_process_and_resumes_bit_identically(stage, world, accum, tmp_path):
    steps, k = 4, 2
    want = reference_run(world, steps, accum, OPT)
    full = run_ranks(ds_workers.zero_worker, world, stage, steps, accum, OPT, False,
                     str(tmp_path), k, timeout=400)
    for r in full:
        assert_same_params(r["params"], want)
        assert r["backend"] == "zero" and r["opt_type"] == "HTMuon"
        # HTMuon's keys survive DeepSpeed's group handling
        assert {"htmuon", "lr", "method", "param_names", "power"} <= set(r["group_keys"][0])
        assert "momentum_buffer" in r["momentum_keys"] and "exp_avg" in r["momentum_keys"]
    layouts = full[0]["layouts"]
    assert _straddles(layouts), "no matrix straddles a partition boundary"
    if stage == 3:  # sub_group_size cuts the matrix group into several flat partitions
        assert full[0]["n_engines"] > 1
    for rank, r in enumerate(full):  # the exchange moved every foreign piece each step
        assert len(set(r["sent"])) == 1 and r["sent"][0] > 0

    resumed = run_ranks(ds_workers.zero_worker, world, stage, steps, accum, OPT, False,
                        str(tmp_path), None, True, timeout=400)
    for a, b in zip(full, resumed):
        assert b["first_step"] == k
        assert b["losses"] == a["losses"][k:]
        for name in a["params"]:
            assert torch.equal(a["params"][name], b["params"][name]), name


def test_zero3_at_three_ranks_with_a_callable_optimizer():
    """deepspeed.initialize(optimizer=callable) at ZeRO-3, W=3 (uneven partition padding)."""
    steps, accum = 2, 1
    want = reference_run(3, steps, accum, OPT)
    results = run_ranks(ds_workers.zero_worker, 3, 3, steps, accum, OPT, False, None, None, False,
                        0, "reference", True, timeout=400)
    for r in results:
        assert_same_params(r["params"], want)
        assert r["opt_type"] == "HTMuon"


@pytest.mark.parametrize("stage", [1, 3])
def test_bf16_with_fp32_master_weights(stage):
    """bf16 model, fp32 master partitions (ZeRO-1 + bf16 goes through DeepSpeed's BF16
    optimizer, ZeRO-3 through stage 3): the step runs on the fp32 masters and stays close to
    the fp32 run; bf16 forward/backward noise (~3 digits) is amplified by Σ^p, so the bound is
    loose (measured 1.6e-2 after 2 steps at both stages)."""
    steps = 2
    want = reference_run(2, steps, 1, OPT)
    results = run_ranks(ds_workers.zero_worker, 2, stage, steps, 1, OPT, True, timeout=400)
    for r in results:
        assert r["backend"] == "zero"
        assert_same_params(r["params"], want, tol=5e-2)
        assert _straddles(r["layouts"])


# -- misconfiguration ---------------------------------------------------------------------------


def _opt():
    return HTMuon([torch.nn.Parameter(torch.zeros(4, 4))], lr=0.02)


def test_optimizer_block_with_htmuon_is_refused():
    cfg = ds_workers.ds_config(2, 2)
    cfg["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-3}}
    with pytest.raises(DeepSpeedConfigError, match="optimizer\" block .* Delete"):
        check_config(cfg, _opt())
    check_config(cfg)  # without a client optimizer the block is DeepSpeed's business


def test_offload_fp16_on_cpu_and_accumulation_mismatch_are_refused():
    cfg = ds_workers.ds_config(3, 2)
    cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    with pytest.raises(DeepSpeedConfigError, match="offload.*silently replace HTMuon by DeepSpeedCPUAdam"):
        check_config(cfg, _opt())
    cfg = ds_workers.ds_config(2, 2)
    cfg["fp16"] = {"enabled": True}
    with pytest.raises(DeepSpeedConfigError, match="fp16 .* CPU"):
        check_config(cfg, _opt(), on_cpu=True)
    cfg = ds_workers.ds_config(2, 2, accum=2)
    with pytest.raises(DeepSpeedConfigError, match="gradient_accumulation_steps is 2 .* accumulates 4"):
        check_config(cfg, _opt(), gradient_accumulation_steps=4)
    cfg["train_batch_size"] = 12
    with pytest.raises(DeepSpeedConfigError, match="train_batch_size=12 is not"):
        check_config(cfg, _opt(), world_size=2)
    for name in ("zero1", "zero2", "zero3"):  # the shipped configs pass as they are
        check_config(REPO / "configs" / "deepspeed" / f"{name}.json", _opt(), world_size=2,
                     gradient_accumulation_steps=2, on_cpu=True)


@pytest.mark.parametrize("case,expected", [
    ("muon_block", "carry DeepSpeed's use_muon=True"),  # DeepSpeed tags them itself
    ("offload", "does not support DeepSpeed optimizer offload"),
])
def test_raw_deepspeed_misconfigurations_fail_loudly(case, expected):
    results = run_ranks(ds_workers.expect_error_worker, 1, case, timeout=240)
    assert expected in results[0], results[0]


# -- Accelerate ---------------------------------------------------------------------------------


def _accelerate(stage: int, script_args: list[str], tmp_path: Path,
                zero3_init: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2",
           "--num_machines", "1", "--main_process_port", str(free_port()), "--use_deepspeed",
           "--deepspeed_config_file", str(REPO / "configs" / "deepspeed" / f"zero{stage}.json"),
           "--mixed_precision", "no", "--zero3_init_flag", str(zero3_init).lower(),
           str(REPO / "tests" / "ds_workers.py"), *script_args]
    return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("stage,zero3_init", [(1, False), (2, False), (3, True)])
def test_accelerate_launch_with_the_shipped_configs(stage, zero3_init, tmp_path):
    """`accelerate launch --use_deepspeed --deepspeed_config_file configs/deepspeed/zero{1,2,3}.json`
    (all "auto"): Accelerate fills micro-batch and accumulation from the Accelerator, and
    gradient_clipping "auto" with 1.0, so the reference clips at 1.0 too. ZeRO-3 builds the
    model under zero.Init (``zero3_init_flag``, as configs/accelerate/deepspeed_zero3.yaml).
    Accelerate's own rank bookkeeping is off on the CPU (num_processes=1 on every rank): the
    script takes rank and world from torch.distributed and sets train_batch_size itself; the
    training itself is checked for equality, not only for running."""
    import json

    steps, accum = 2, 2
    out = tmp_path / "result.pt"
    proc = _accelerate(stage, [str(steps), str(accum), str(out), json.dumps(OPT)], tmp_path,
                       zero3_init)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    got = torch.load(out)
    assert got["type"] == "HTMuon" and got["backend"] == "zero" and got["clip"] == 1.0
    want = reference_run(2, steps, accum, OPT, clip=got["clip"])
    assert_same_params(got["params"], want)
