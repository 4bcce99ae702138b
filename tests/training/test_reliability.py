"""Small versions of benchmarks/reliability.py (issue #14): pre-emption by a signal, a damaged
newest checkpoint, a rank killed or stopped, non-finite storms, and the SLURM requeue."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ACCELERATE, REPO, TINY, env_for, free_port, launch, metrics

STEPS = 6


def _losses_equal(a: Path, b: Path, steps: int) -> None:
    la, lb = metrics(a)[0], metrics(b)[0]
    assert sorted(lb) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert lb[step] == la[step], f"step {step}: {lb[step]!r} != {la[step]!r} (resume must be bit-identical)"


# --- units --------------------------------------------------------------------------------------

def test_manifest_detects_truncation_and_bit_flips(tmp_path):
    from htmuon_dist.training.checkpoint import MANIFEST, verify, write_manifest

    (tmp_path / "sharded").mkdir()
    (tmp_path / "sharded" / "a.bin").write_bytes(os.urandom(5000))
    (tmp_path / "trainer_state.json").write_text("{}")
    assert verify(tmp_path) == [f"no {MANIFEST} (the save did not finish, or an older htmuon-dist wrote it)"]
    write_manifest(tmp_path)
    assert verify(tmp_path) == [] and verify(tmp_path, "size") == []
    data = bytearray((tmp_path / "sharded" / "a.bin").read_bytes())
    data[1234] ^= 0xFF
    (tmp_path / "sharded" / "a.bin").write_bytes(bytes(data))
    assert verify(tmp_path) == ["sharded/a.bin does not match its SHA-256"]
    assert verify(tmp_path, "size") == [] and verify(tmp_path, "none") == []
    (tmp_path / "sharded" / "a.bin").write_bytes(bytes(data[:100]))
    assert verify(tmp_path, "size") == ["sharded/a.bin has 100 bytes, the manifest says 5000"]
    (tmp_path / "sharded" / "a.bin").unlink()
    assert verify(tmp_path) == ["sharded/a.bin is missing"]


def test_preemption_watch_records_the_signal():
    from htmuon_dist.training.preemption import PreemptionWatch

    import torch

    old = signal.getsignal(signal.SIGUSR1)
    try:
        watch = PreemptionWatch.install("SIGUSR1")
        assert watch.agreed(torch.device("cpu")) is None
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert watch.agreed(torch.device("cpu")) == "SIGUSR1"
        assert PreemptionWatch.install("none").agreed(torch.device("cpu")) is None
    finally:
        signal.signal(signal.SIGUSR1, old)


class _FakeAccelerator:
    """What checkpoint.save asks of Accelerate in a single process without a model."""

    is_main_process = True
    process_index = 0

    def save_state(self, directory: str) -> None:
        Path(directory, "random_states_0.pkl").write_bytes(b"x")


def test_save_fault_fires_inside_a_comma_list(tmp_path, monkeypatch):
    """``save:3,nan:1-2`` holds two faults; the save fault must fire at step 3 (it used to be
    matched against the whole variable, so any second fault switched it off)."""
    from htmuon_dist.training import checkpoint, faults

    def exit_(code: int) -> None:
        raise SystemExit(code)

    monkeypatch.setattr(checkpoint.os, "_exit", exit_)
    monkeypatch.setenv("HTMUON_FAULT_INJECT", "save:3,nan:1-2")
    final = checkpoint.save(_FakeAccelerator(), tmp_path, 2, None, None, "none", {}, {"step": 2}, keep=2)
    assert final.name == "step_00000002" and (final / checkpoint.MANIFEST).is_file()
    with pytest.raises(SystemExit) as died:
        checkpoint.save(_FakeAccelerator(), tmp_path, 3, None, None, "none", {}, {"step": 3}, keep=2)
    assert died.value.code == 17
    assert (tmp_path / "checkpoints" / ".tmp_step_00000003").is_dir()
    assert not (tmp_path / "checkpoints" / "step_00000003").exists()
    # The same variable's other fault is read by the same parser.
    nan = faults.poison_loss(torch.ones(()), 2)
    assert torch.isnan(nan) and not torch.isnan(faults.poison_loss(torch.ones(()), 3))


_GLOO_CLOSED = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by "
                "peer [127.0.0.1]:50087. This is typically caused by a remote worker crashing.")
_GLOO_TIMEOUT = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out "
                 "waiting 3000ms for recv operation to complete")


def test_lost_peer_is_only_a_lost_peer():
    """The CLI's os._exit(1) path is for a dead or hung rank only (the messages above are what
    torch 2.13's gloo raised when a peer exited or slept past the timeout); a RuntimeError of
    our own that merely names NCCL, gloo or a ProcessGroup must propagate with its traceback."""
    import torch.distributed as dist

    from htmuon_dist.training.cli import _lost_peer

    assert _lost_peer(RuntimeError(_GLOO_CLOSED)) and _lost_peer(RuntimeError(_GLOO_TIMEOUT))
    assert _lost_peer(dist.DistBackendError("NCCL error: remote process exited"))
    assert _lost_peer(dist.DistNetworkError("Connection reset by peer"))
    assert _lost_peer(dist.DistStoreError("wait timeout after 30000ms"))
    for ours in (RuntimeError("ProcessGroup gloo: our engine sent 3 splits for 4 ranks"),
                 RuntimeError("NCCL communicator expected a CUDA tensor, got a CPU one (our bug)"),
                 RuntimeError("gloo all_to_all: input split sizes do not sum to the tensor size"),
                 RuntimeError("the step timed out because our own loop is wrong"),
                 ValueError("Connection closed by peer"), KeyError("gloo")):
        assert not _lost_peer(ours), ours


def _lost_peer_worker(rank: int, world: int) -> bool:
    import torch.distributed as dist

    from htmuon_dist.training.cli import _lost_peer

    t = torch.ones(4)
    dist.all_reduce(t)
    if rank == 1:
        os._exit(3)  # a rank that dies between two collectives
    try:
        dist.all_reduce(t)
    except Exception as e:  # noqa: BLE001 - what gloo raises is the point
        return _lost_peer(e)
    return False


@pytest.mark.multirank
def test_lost_peer_recognises_what_gloo_raises():
    """The classification holds for the error this torch really raises when a peer dies."""
    from multirank import run_ranks

    results = run_ranks(_lost_peer_worker, 2, timeout=120, pg_timeout=10, expect_errors=True)
    assert results[0] == ("ok", True), results


# --- single process: damaged checkpoint, non-finite storms -------------------------------------

@pytest.fixture(scope="module")
def single_full(cache_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single_full")
    launch(cache_dir, None, [*TINY, "--max_steps", str(STEPS), "--save_steps", "2", "--export_model", "false",
                             "--output_dir", str(out)])
    return out


def test_damaged_newest_checkpoint_falls_back(single_full, cache_dir, tmp_path):
    base = [*TINY, "--max_steps", str(STEPS), "--save_steps", "2", "--export_model", "false", "--output_dir", str(tmp_path)]
    launch(cache_dir, None, [*base, "--stop_at_step", "4"])
    newest = tmp_path / "checkpoints" / "step_00000004"
    victim = max((p for p in newest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    # An explicit --resume of the damaged one is a configuration error naming it.
    proc = launch(cache_dir, None, [*base, "--resume", str(newest)], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert f"--resume {newest}: the checkpoint is damaged" in proc.stderr and victim.name in proc.stderr
    # auto: reported by name, the step-2 checkpoint is used, and the run ends as the uninterrupted one.
    proc = launch(cache_dir, None, base)
    assert f"checkpoint {newest} is damaged" in proc.stdout and "resumed at step 2" in proc.stdout
    _losses_equal(single_full, tmp_path, STEPS)


def test_every_checkpoint_damaged_is_a_clear_error(cache_dir, tmp_path):
    base = [*TINY, "--max_steps", "4", "--save_steps", "2", "--export_model", "false", "--output_dir", str(tmp_path)]
    launch(cache_dir, None, [*base, "--stop_at_step", "2"])
    (tmp_path / "checkpoints" / "step_00000002" / "manifest.json").unlink()
    proc = launch(cache_dir, None, base, check=False)
    assert proc.returncode == 2 and "every checkpoint" in proc.stderr and "--resume never" in proc.stderr


def test_skipped_steps_are_logged(cache_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HTMUON_FAULT_INJECT", "nan:3-3")
    launch(cache_dir, None, [*TINY, "--max_steps", "5", "--save_steps", "0", "--export_model", "false",
                             "--nonfinite", "skip", "--output_dir", str(tmp_path)])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("skipped_step")] == [3]
    assert json.loads((tmp_path / "summary.json").read_text())["skipped_steps"] == 1


def test_nonfinite_storm_stops_after_patience(cache_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HTMUON_FAULT_INJECT", "nan:2+")
    proc = launch(cache_dir, None, [*TINY, "--max_steps", "20", "--save_steps", "0", "--export_model", "false",
                                    "--nonfinite", "skip", "--nonfinite_patience", "3", "--output_dir", str(tmp_path)],
                  check=False)
    assert proc.returncode != 0 and "FloatingPointError" in proc.stderr
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["step"] for r in rows if r.get("skipped_step")]
    # HTMuon raises on the 3rd consecutive non-finite step (or right after the 3rd skip): either
    # way the storm ends there, long before --max_steps 20.
    assert skipped in ([2, 3], [2, 3, 4]), skipped
    assert max(r["step"] for r in rows) <= 4


# --- 2 processes (FSDP2): pre-emption, a killed rank, a stopped rank ---------------------------


@pytest.mark.multirank
def test_sigterm_on_one_rank_stops_within_the_check_interval_and_resume_is_exact(cache_dir, tmp_path_factory, monkeypatch):
    """Only rank 1 gets SIGTERM after step 3; the ranks agree on it at the next check step
    (``--preempt_check_steps 2``: step 4), both checkpoint step 4 and exit 75; the rerun
    resumes at 4 and reproduces the uninterrupted losses bit for bit."""
    full, part = tmp_path_factory.mktemp("fsdp2_full6"), tmp_path_factory.mktemp("fsdp2_sigterm")
    base = [*TINY, "--max_steps", str(STEPS), "--save_steps", "4", "--export_model", "false",
            "--preempt_check_steps", "2"]
    launch(cache_dir, "cpu_fsdp2.yaml", [*base, "--output_dir", str(full)])
    monkeypatch.setenv("HTMUON_FAULT_INJECT", "sigterm:3@1")
    proc = launch(cache_dir, "cpu_fsdp2.yaml", [*base, "--output_dir", str(part)], check=False)
    monkeypatch.delenv("HTMUON_FAULT_INJECT")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and out.count("exitcode  : 75") == 2, out[-3000:]
    assert json.loads((part / "PREEMPTED").read_text())["step"] == 4
    assert (part / "checkpoints" / "step_00000004" / "manifest.json").is_file()
    assert not (part / "checkpoints" / "step_00000005").exists()
    assert json.loads((part / "summary.json").read_text())["preempted_by"] == "SIGTERM"
    proc = launch(cache_dir, "cpu_fsdp2.yaml", [*base, "--output_dir", str(part)])
    assert "resumed at step 4" in proc.stdout and not (part / "PREEMPTED").exists()
    _losses_equal(full, part, STEPS)


@pytest.mark.multirank
def test_checkpoint_inside_a_batch_window_resumes_exactly(cache_dir, tmp_path_factory):
    """--packing false draws the batches of a window of steps ahead (StepBatches, windows end
    at every 4th step here): the step-2 checkpoint, taken while step 3's batches are already
    drawn, must hold the stream where step 2 left it."""
    full, part = tmp_path_factory.mktemp("padded_full"), tmp_path_factory.mktemp("padded_part")
    base = [*TINY, "--max_steps", str(STEPS), "--save_steps", "2", "--export_model", "false",
            "--packing", "false", "--preempt_check_steps", "4"]
    launch(cache_dir, "cpu_fsdp2.yaml", [*base, "--output_dir", str(full)])
    launch(cache_dir, "cpu_fsdp2.yaml", [*base, "--output_dir", str(part), "--stop_at_step", "3"])
    step2 = part / "checkpoints" / "step_00000002"
    proc = launch(cache_dir, "cpu_fsdp2.yaml", [*base, "--output_dir", str(part), "--resume", str(step2)])
    assert "resumed at step 2" in proc.stdout
    _losses_equal(full, part, STEPS)


def _start(cache: Path, out: Path, extra: list[str]) -> subprocess.Popen:
    cmd = [ACCELERATE, "launch", "--config_file", "configs/accelerate/cpu_fsdp2.yaml", "--main_process_port",
           str(free_port()), "launch/train.py", *TINY, "--max_steps", "200", "--save_steps", "0",
           "--export_model", "false", "--output_dir", str(out), *extra]
    env = env_for(cache)
    env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = "5"
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _rank1(launcher: int) -> int:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from reliability import rank_pid

    return rank_pid(launcher, 1)


def _wait_step(out: Path, proc: subprocess.Popen, step: int, limit: float = 180) -> None:
    t0 = time.time()
    while time.time() - t0 < limit and proc.poll() is None:
        path = out / "metrics.jsonl"
        if path.is_file() and len(path.read_text().splitlines()) >= step:
            return
        time.sleep(0.1)
    raise AssertionError(f"step {step} not reached")


@pytest.mark.multirank
@pytest.mark.parametrize("fault", ["kill9", "sigstop"])
def test_a_lost_rank_never_hangs_the_others(fault, cache_dir, tmp_path):
    """kill -9 of rank 1, or SIGSTOP (a rank that stops calling step()): rank 0 exits within
    the process-group timeout with a line naming itself, and the launch ends."""
    timeout_s = 10
    proc = _start(cache_dir, tmp_path, ["--dist_timeout_s", str(timeout_s)])
    try:
        _wait_step(tmp_path, proc, 2)
        victim = _rank1(proc.pid)
        t0 = time.time()
        os.kill(victim, signal.SIGKILL if fault == "kill9" else signal.SIGSTOP)
        out, _ = proc.communicate(timeout=timeout_s + 60)
        elapsed = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
        try:
            os.kill(victim, signal.SIGKILL)
        except (ProcessLookupError, UnboundLocalError):
            pass
    assert proc.returncode != 0
    if fault == "sigstop":
        assert "htmuon-train: rank 0: lost contact with the other ranks" in out, out[-3000:]
        assert f"--dist_timeout_s {timeout_s}" in out
        assert elapsed < timeout_s + 40, elapsed
    else:
        # The launcher names the dead rank; the survivor exits at once (gloo sees the closed socket).
        assert "rank      : 1" in out or "lost contact" in out, out[-3000:]
        assert elapsed < 40, elapsed


# --- the SLURM requeue --------------------------------------------------------------------------

def test_sbatch_requeues_after_a_preemption(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    out = tmp_path / "out"
    (bindir / "srun").write_text(f'#!/usr/bin/env bash\nmkdir -p {out}\necho \'{{"step": 7}}\' > {out}/PREEMPTED\nexit 1\n')
    (bindir / "scontrol").write_text(f'#!/usr/bin/env bash\necho "$@" > {tmp_path}/scontrol.args\n')
    for f in bindir.iterdir():
        f.chmod(0o755)
    env = {"PATH": f"{bindir}:{os.environ['PATH']}", "SLURM_JOB_ID": "777", "SLURM_SUBMIT_DIR": str(REPO),
           "OUTPUT_DIR": str(out), "HOME": os.environ.get("HOME", "/tmp")}
    proc = subprocess.run(["bash", str(REPO / "launch/slurm/train_multinode.sbatch")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "777"]
    (out / "PREEMPTED").unlink()
    (bindir / "srun").write_text("#!/usr/bin/env bash\nexit 3\n")
    proc = subprocess.run(["bash", str(REPO / "launch/slurm/train_multinode.sbatch")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, "a plain failure is not requeued and keeps its status"


def test_config_and_model_do_not_import_each_other():
    """Issue #14 item 9: config.py and model.py share training/common.py instead of a cycle."""
    import ast

    def runtime_imports(name: str) -> set[str]:
        tree = ast.parse((REPO / "htmuon_dist" / "training" / f"{name}.py").read_text())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                node.body = []  # typing-only imports do not run
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found.add(node.module)
        return found

    assert "model" not in runtime_imports("config")
    assert "config" not in runtime_imports("model")
