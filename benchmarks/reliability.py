"""Injects faults into the tiny FSDP2 x 2 CPU run and prints what survived.

    python benchmarks/reliability.py [--steps 40] [--save_steps 10] [--fault_at 15]
                                     [--faults sigterm,damaged,kill9,hang] [--dist_timeout_s 30]

First an uninterrupted run of ``--steps`` steps (the reference), then for each fault a run that
suffers it and a plain rerun (``--resume auto``) that finishes the job:

* ``sigterm``: once step >= ``--fault_at`` is logged, SIGTERM to every process of the launch
  (its process group: the launcher and both ranks, as SLURM and Kubernetes do).
* ``damaged``: a run stopped at the last checkpoint before the end (``--stop_at_step``), then the
  largest file of that newest checkpoint is truncated to half its size.
* ``kill9``: once step >= ``--fault_at`` is logged, SIGKILL to rank 1 only.
* ``hang``: once step >= ``--fault_at`` is logged, SIGSTOP to rank 1 (a rank that stops calling
  ``step()``); rank 0 must give up after ``--dist_timeout_s``.

Columns: fault; survived (the faulty run ended by itself within its limit and the rerun
finished); exit (the launcher's exit status) and seconds from the fault to the end of the
faulty run; steps lost (steps completed before the fault that the rerun had to redo); equal
(the rerun's exported weights are bit-identical to the reference's). Exit status 1 when a
fault is not survived or the weights differ.

Everything runs on the CPU with gloo (2 processes, 1 thread each); about 70 s per run here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
ACCELERATE = str(Path(PYTHON).with_name("accelerate"))
TINY = ["--config", "configs/train/tiny_cpu.yaml", "--seq_len", "64", "--micro_batch_size", "4",
        "--total_batch_size", "8", "--warmup_steps", "2", "--eval_tokens", "2048", "--logging_steps", "1",
        "--eval_steps", "0", "--report_to", "jsonl", "--plot", "false", "--progress_bar", "false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(cache: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HTMUON_CACHE=str(cache), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
               # the launcher gives ranks this long to exit after it forwards a signal
               TORCH_ELASTIC_SHUTDOWN_TIMEOUT="20")
    env.pop("ACCELERATE_USE_FSDP", None)
    env.pop("HTMUON_FAULT_INJECT", None)
    env.update(extra)
    return env


def start(out: Path, args: list[str], cache: Path, log: Path, **env: str) -> subprocess.Popen:
    """``accelerate launch`` FSDP2 x 2 in its own process group (so one killpg reaches all)."""
    cmd = [ACCELERATE, "launch", "--config_file", "configs/accelerate/cpu_fsdp2.yaml", "--main_process_port",
           str(_free_port()), "launch/train.py", *TINY, *args, "--output_dir", str(out)]
    return subprocess.Popen(cmd, cwd=REPO, env=environment(cache, **env), stdout=open(log, "a"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait(proc: subprocess.Popen, limit: float) -> tuple[Optional[int], float]:
    """(exit status or None if still running after ``limit`` s, then killed; seconds waited)."""
    t0 = time.perf_counter()
    try:
        return proc.wait(timeout=limit), time.perf_counter() - t0
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None, time.perf_counter() - t0


def logged_step(out: Path) -> int:
    """The last training step in metrics.jsonl (0 if none)."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def wait_for_step(proc: subprocess.Popen, out: Path, step: int, limit: float = 600) -> int:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit:
        s = logged_step(out)
        if s >= step or proc.poll() is not None:
            return s
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached in {limit} s")


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def rank_pids(launcher: int) -> dict[int, int]:
    """RANK -> pid of the launcher's worker processes (Linux /proc; torchrun starts each worker
    in its own session, so they are found by parentage, not by process group)."""
    found: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            chain, p = set(), pid
            while p > 1 and p not in chain:
                chain.add(p)
                p = _ppid(p)
            if launcher not in chain or b"launch/train.py" not in (entry / "cmdline").read_bytes():
                continue
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        for item in env:
            if item.startswith(b"RANK="):
                found[int(item[5:])] = pid
    return found


def rank_pid(launcher: int, rank: int) -> int:
    for _ in range(100):
        pids = rank_pids(launcher)
        if rank in pids:
            return pids[rank]
        time.sleep(0.1)
    raise RuntimeError(f"rank {rank}'s process not found")


def resumed_at(log: Path) -> int:
    text = log.read_text()
    marker = "resumed at step "
    return int(text.rsplit(marker, 1)[1].split()[0]) if marker in text else 0


def weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "final_model" / "model.safetensors"))


def equal(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def damage_newest(out: Path) -> Path:
    """Truncates the largest file of the newest checkpoint to half; returns that file."""
    newest = sorted((out / "checkpoints").glob("step_*"))[-1]
    victim = max((p for p in newest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    return victim


def fault_run(kind: str, a, base: list[str], cache: Path, work: Path, reference: dict) -> dict:
    out, log = work / kind, work / f"{kind}.log"
    row = {"fault": kind, "survived": False, "exit": None, "fault_to_exit_s": None, "steps_lost": None, "equal": False}
    extra: dict[str, str] = {}
    if kind == "damaged":
        last_save = (a.steps - 1) // a.save_steps * a.save_steps
        proc = start(out, [*base, "--stop_at_step", str(last_save)], cache, log)
        row["exit"], _ = wait(proc, 900)
        victim = damage_newest(out)
        completed = last_save
        row["fault_to_exit_s"] = 0.0
        row["note"] = f"truncated {victim.relative_to(out)}"
    else:
        proc = start(out, base, cache, log, **extra)
        wait_for_step(proc, out, a.fault_at)
        t0 = time.perf_counter()
        if kind == "sigterm":  # as SLURM does: every process of the job, launcher and ranks
            for pid in rank_pids(proc.pid).values():
                os.kill(pid, signal.SIGTERM)
            os.killpg(proc.pid, signal.SIGTERM)
        elif kind == "kill9":
            os.kill(rank_pid(proc.pid, 1), signal.SIGKILL)
        elif kind == "hang":
            stopped = rank_pid(proc.pid, 1)
            os.kill(stopped, signal.SIGSTOP)
        status, _ = wait(proc, a.dist_timeout_s + 120)
        row["exit"], row["fault_to_exit_s"] = status, round(time.perf_counter() - t0, 1)
        completed = logged_step(out)
        if kind == "hang" and status is None:
            row["note"] = "hung (killed by the benchmark)"
    ended = row["exit"] is not None
    rerun = start(out, base, cache, log)
    status, _ = wait(rerun, 900)
    start_step = resumed_at(log)
    row["steps_lost"] = max(0, completed - start_step)
    row["resumed_at"] = start_step
    row["survived"] = bool(ended and status == 0 and logged_step(out) == a.steps)
    if status == 0:
        row["equal"] = equal(weights(out), reference)
    if kind == "damaged":
        row["damage_reported"] = "is damaged" in log.read_text()
    return row


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40, help="optimizer steps of every run (default 40)")
    p.add_argument("--save_steps", type=int, default=10, help="checkpoint every N steps (default 10)")
    p.add_argument("--fault_at", type=int, default=15, help="inject sigterm/kill9/hang once this step is logged")
    p.add_argument("--faults", default="sigterm,damaged,kill9,hang", help="comma list of sigterm, damaged, kill9, hang")
    p.add_argument("--dist_timeout_s", type=int, default=30, help="--dist_timeout_s of the runs (the hang fault waits for it)")
    p.add_argument("--work", default=None, help="directory for the runs (default: a temporary one, removed)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--cache", default=os.environ.get("HTMUON_CACHE"),
                   help="offline corpus/tokenizer cache (default $HTMUON_CACHE, else one inside --work)")
    a = p.parse_args(argv)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="htmuon_reliability_"))
    work.mkdir(parents=True, exist_ok=True)
    cache = Path(a.cache) if a.cache else work / "cache"
    base = ["--max_steps", str(a.steps), "--save_steps", str(a.save_steps), "--save_total_limit", "2",
            "--dist_timeout_s", str(a.dist_timeout_s)]
    t0 = time.perf_counter()
    ref_out, ref_log = work / "reference", work / "reference.log"
    status, secs = wait(start(ref_out, base, cache, ref_log), 900)
    if status != 0:
        print(f"the uninterrupted run failed ({status}); see {ref_log}")
        return 1
    print(f"reference: {a.steps} steps, FSDP2 x 2 on the CPU, checkpoint every {a.save_steps}: {secs:.0f} s", flush=True)
    reference = weights(ref_out)
    rows = []
    for kind in [k.strip() for k in a.faults.split(",") if k.strip()]:
        row = fault_run(kind, a, base, cache, work, reference)
        rows.append(row)
        print(f"  {kind}: {json.dumps(row)}", flush=True)
    print()
    print("| fault | survived | launcher exit | s from fault to exit | steps lost | final weights equal |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['fault']} | {'yes' if r['survived'] else 'NO'} | {r['exit']} | {r['fault_to_exit_s']} | "
              f"{r['steps_lost']} (resumed at {r['resumed_at']}) | {'yes' if r['equal'] else 'NO'} |")
    print(f"\n{time.perf_counter() - t0:.0f} s in all; logs in {work}" if a.work else f"\n{time.perf_counter() - t0:.0f} s in all")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r["survived"] and r["equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
