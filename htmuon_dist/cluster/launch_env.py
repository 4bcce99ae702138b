"""Cluster environment -> ``accelerate launch`` command, run once per node.

    python -m htmuon_dist.cluster.launch_env [--config_file F] [--script S] [--dry_run] -- [script args]

Reads the topology from the environment, in this order of precedence (the first group that
sets a value wins; every later group that also sets it must agree, or the launch is refused):

==============  ===============  ===================  =========================================
setting         generic          Kubernetes           SLURM
==============  ===============  ===================  =========================================
nodes           NNODES           PET_NNODES           SLURM_STEP_NUM_NODES / SLURM_NNODES
node rank       NODE_RANK        PET_NODE_RANK        SLURM_NODEID
procs per node  NPROC_PER_NODE   PET_NPROC_PER_NODE   SLURM_GPUS_ON_NODE / SLURM_GPUS_PER_NODE
rendezvous      MASTER_ADDR      PET_MASTER_ADDR      first host of SLURM_STEP_NODELIST /
                                                      SLURM_JOB_NODELIST / SLURM_NODELIST
port            MASTER_PORT      PET_MASTER_PORT      20000 + SLURM_JOB_ID mod 20000
==============  ===============  ===================  =========================================

Without any of these: one node, one process per visible GPU, 127.0.0.1:29500. ``WORLD_SIZE``,
when set, is the total number of processes and must equal nodes x procs per node (it gives the
node count when nothing else does). A Kubeflow PyTorchJob without ``nprocPerNode`` (no ``PET_*``
variables) sets ``WORLD_SIZE`` = number of pods and ``RANK`` = pod index; inside Kubernetes
(``KUBERNETES_SERVICE_HOST``) and with no other node count, they are read that way.

The result is ``accelerate launch --num_machines N --machine_rank R --num_processes N*P
--main_process_ip A --main_process_port PORT [--config_file F] SCRIPT ARGS``; ``--dry_run`` (or
``HTMUON_DRY_RUN=1``) prints it instead of running it. Errors name the variable and the fix and
exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

from .hostlist import expand_hostlist

DEFAULT_PORT = 29500
EXIT_CONFIG_ERROR = 2


class LaunchEnvError(ValueError):
    """The environment does not describe a consistent multi-node launch; the message says how to fix it."""


@dataclass(frozen=True)
class Topology:
    """Where this node sits in the job, and where every node meets."""

    num_machines: int
    machine_rank: int
    nproc_per_node: int
    main_process_ip: str
    main_process_port: int
    source: str  # "slurm", "kubernetes", "env" or "local": which group supplied the node count/rank
    origin: dict[str, str] = field(default_factory=dict, compare=False)  # setting -> variable it came from

    @property
    def num_processes(self) -> int:
        """Processes over all nodes (accelerate's ``--num_processes``)."""
        return self.num_machines * self.nproc_per_node

    def describe(self) -> str:
        """One line for the log: the numbers and where each came from."""
        o = self.origin
        return (f"{self.source}: {self.num_machines} node(s) [{o.get('nnodes', 'default')}] x "
                f"{self.nproc_per_node} process(es) [{o.get('nproc', 'default')}] = {self.num_processes}; "
                f"this node {self.machine_rank} [{o.get('node_rank', 'default')}]; rendezvous "
                f"{self.main_process_ip}:{self.main_process_port} "
                f"[{o.get('addr', 'default')}, {o.get('port', 'default')}]")


# -- parsing helpers ------------------------------------------------------------------------------


def _int(env: Mapping[str, str], name: str, minimum: int = 0) -> int:
    raw = env[name].strip()
    if ":" in raw and name.endswith("NNODES"):
        raise LaunchEnvError(
            f"{name}={raw!r} is an elastic range; accelerate's static rendezvous needs a fixed node "
            f"count: set {name} to one number")
    if not re.fullmatch(r"[+]?\d+", raw):
        raise LaunchEnvError(f"{name}={raw!r} is not a whole number: set it to an integer >= {minimum}")
    value = int(raw)
    if value < minimum:
        raise LaunchEnvError(f"{name}={value} must be >= {minimum}")
    return value


def _present(env: Mapping[str, str], name: str) -> bool:
    return name in env and env[name].strip() != ""


def _gpus_from_slurm_spec(name: str, raw: str) -> int:
    """``8``, ``gpu:8``, ``gpu:a100:8``, ``a100:4,v100:2`` (summed) -> a count."""
    total = 0
    for item in raw.split(","):
        item = item.strip()
        # "gpu:a100:8(IDX:0-7)" appears in some SLURM versions' job records: drop the index part.
        item = item.split("(", 1)[0]
        count = item.rsplit(":", 1)[-1]
        if not count.isdigit():
            raise LaunchEnvError(f"{name}={raw!r}: cannot read a GPU count; set NPROC_PER_NODE explicitly")
        total += int(count)
    return total


def visible_gpu_count(env: Mapping[str, str]) -> int:
    """GPUs this process may use: CUDA_VISIBLE_DEVICES when set, otherwise what torch sees."""
    if "CUDA_VISIBLE_DEVICES" in env:
        devices = [d for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
        # "-1" / "NoDevFiles" are how SLURM and users hide all GPUs.
        return 0 if any(d.strip() in ("-1", "NoDevFiles") for d in devices) else len(devices)
    try:
        import torch  # only here: the common paths never pay for importing torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no usable torch means no GPUs to count
        return 0


def _agree(setting: str, candidates: list[tuple[str, int]]) -> tuple[str, int]:
    """The first candidate; every other one must carry the same value."""
    first_name, first = candidates[0]
    for name, value in candidates[1:]:
        if value != first:
            by_scheduler = name.startswith(("SLURM_", "PET_"))
            raise LaunchEnvError(
                f"{first_name}={first} disagrees with {name}={value} ({setting}): both describe this "
                f"job, so " + (f"unset {first_name} (the scheduler sets {name}) or make them equal"
                               if by_scheduler else "fix one of them or unset it"))
    return first_name, first


# -- the resolution -------------------------------------------------------------------------------


def _slurm_checks(env: Mapping[str, str]) -> None:
    """One ``accelerate launch`` per node: more SLURM tasks on a node would start it twice."""
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"):
        if _present(env, name):
            counts = [int(m) for m in re.findall(r"(\d+)(?:\(x\d+\))?", env[name])]
            if any(c > 1 for c in counts):
                raise LaunchEnvError(
                    f"{name}={env[name]}: run one task per node (#SBATCH --ntasks-per-node=1, "
                    f"srun --ntasks-per-node=1); accelerate launch starts the per-GPU processes itself")
            return


def resolve_topology(env: Optional[Mapping[str, str]] = None,
                     gpu_count: Optional[Callable[[], int]] = None,
                     scontrol: Optional[str] = "auto") -> Topology:
    """Reads this node's place in the job from ``env`` (default ``os.environ``).

    ``gpu_count`` returns the GPUs visible here (default: CUDA_VISIBLE_DEVICES or torch); it is
    only called when no variable gives the processes per node. Raises :class:`LaunchEnvError`.
    """
    env = dict(os.environ if env is None else env)
    count_gpus = gpu_count or (lambda: visible_gpu_count(env))
    if _present(env, "TORCHELASTIC_RUN_ID") or (_present(env, "LOCAL_RANK") and _present(env, "LOCAL_WORLD_SIZE")):
        raise LaunchEnvError(
            "TORCHELASTIC_RUN_ID/LOCAL_RANK are set: this process was itself started by torchrun or "
            "accelerate; run the entrypoint once per node (it starts the per-device processes), "
            "or unset those variables if they leaked from an outer launch")

    slurm = _present(env, "SLURM_JOB_ID") and any(
        _present(env, n) for n in ("SLURM_NNODES", "SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES"))
    pet = any(_present(env, n) for n in ("PET_NNODES", "PET_NODE_RANK", "PET_NPROC_PER_NODE"))
    k8s_legacy = (not pet and _present(env, "KUBERNETES_SERVICE_HOST") and not _present(env, "NNODES")
                  and not slurm and _present(env, "WORLD_SIZE") and _present(env, "RANK"))
    origin: dict[str, str] = {}

    # Node count.
    nnodes_c: list[tuple[str, int]] = []
    if _present(env, "NNODES"):
        nnodes_c.append(("NNODES", _int(env, "NNODES", 1)))
    if _present(env, "PET_NNODES"):
        nnodes_c.append(("PET_NNODES", _int(env, "PET_NNODES", 1)))
    slurm_hosts: list[str] = []
    if slurm:
        _slurm_checks(env)
        name = next(n for n in ("SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES") if _present(env, n))
        nnodes_c.append((name, _int(env, name, 1)))
        list_name = next((n for n in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                          if _present(env, n)), None)
        if list_name is not None:
            try:
                slurm_hosts = expand_hostlist(env[list_name], scontrol=scontrol)
            except ValueError as exc:
                raise LaunchEnvError(f"{list_name}: {exc}; set MASTER_ADDR to the first node's address") from None
            if len(slurm_hosts) != nnodes_c[-1][1]:
                raise LaunchEnvError(
                    f"{list_name}={env[list_name]!r} names {len(slurm_hosts)} node(s) but {name}="
                    f"{nnodes_c[-1][1]}: run the entrypoint through srun with one task per node, so "
                    f"both describe the same step")
    if k8s_legacy:
        nnodes_c.append(("WORLD_SIZE", _int(env, "WORLD_SIZE", 1)))

    # Processes per node.
    nproc_c: list[tuple[str, int]] = []
    if _present(env, "NPROC_PER_NODE"):
        nproc_c.append(("NPROC_PER_NODE", _int(env, "NPROC_PER_NODE", 1)))
    if _present(env, "PET_NPROC_PER_NODE"):
        raw = env["PET_NPROC_PER_NODE"].strip().lower()
        if raw in ("auto", "gpu"):
            gpus = count_gpus()
            if gpus < 1:
                raise LaunchEnvError(
                    f"PET_NPROC_PER_NODE={raw} but no GPU is visible in this pod: request GPUs "
                    f"(resources.limits nvidia.com/gpu) or set nprocPerNode to a number")
            nproc_c.append(("PET_NPROC_PER_NODE", gpus))
        elif raw == "cpu":
            nproc_c.append(("PET_NPROC_PER_NODE", os.cpu_count() or 1))
        else:
            nproc_c.append(("PET_NPROC_PER_NODE", _int(env, "PET_NPROC_PER_NODE", 1)))
    gpu_capacity: Optional[tuple[str, int]] = None  # a limit, not a request: fewer processes are fine
    if slurm:
        if _present(env, "SLURM_GPUS_ON_NODE"):
            gpu_capacity = ("SLURM_GPUS_ON_NODE", _int(env, "SLURM_GPUS_ON_NODE", 0))
        elif _present(env, "SLURM_GPUS_PER_NODE"):
            gpu_capacity = ("SLURM_GPUS_PER_NODE", _gpus_from_slurm_spec("SLURM_GPUS_PER_NODE", env["SLURM_GPUS_PER_NODE"]))
    if nproc_c:
        nproc_name, nproc = _agree("processes per node", nproc_c)
        if gpu_capacity and 0 < gpu_capacity[1] < nproc:
            raise LaunchEnvError(
                f"{nproc_name}={nproc} but {gpu_capacity[0]}={gpu_capacity[1]}: one process per GPU; "
                f"lower {nproc_name} or request more GPUs (#SBATCH --gpus-per-node)")
    elif gpu_capacity and gpu_capacity[1] > 0:
        nproc_name, nproc = gpu_capacity
    else:
        gpus = count_gpus()
        if gpus < 1:
            raise LaunchEnvError(
                "no GPU visible and NPROC_PER_NODE is not set: export NPROC_PER_NODE=<processes on "
                "this node> (on the CPU, e.g. NPROC_PER_NODE=2 with a configs/accelerate/cpu_*.yaml config)")
        nproc_name, nproc = "visible GPUs", gpus
    origin["nproc"] = nproc_name

    # WORLD_SIZE (total processes) fills in or checks the node count.
    if _present(env, "WORLD_SIZE") and not k8s_legacy and not pet:
        world = _int(env, "WORLD_SIZE", 1)
        if world % nproc:
            raise LaunchEnvError(
                f"WORLD_SIZE={world} (total processes) is not a multiple of {nproc_name}={nproc}: "
                f"set WORLD_SIZE to nodes x processes per node, or unset it")
        nnodes_c.append(("WORLD_SIZE/" + nproc_name, world // nproc))
    if nnodes_c:
        nnodes_name, nnodes = _agree("number of nodes", nnodes_c)
    else:
        nnodes_name, nnodes = "default", 1
    origin["nnodes"] = nnodes_name

    # This node's rank.
    rank_c: list[tuple[str, int]] = []
    for name in ("NODE_RANK", "PET_NODE_RANK"):
        if _present(env, name):
            rank_c.append((name, _int(env, name, 0)))
    if slurm and _present(env, "SLURM_NODEID"):
        rank_c.append(("SLURM_NODEID", _int(env, "SLURM_NODEID", 0)))
    if k8s_legacy:
        rank_c.append(("RANK", _int(env, "RANK", 0)))
    if rank_c:
        rank_name, rank = _agree("node rank", rank_c)
    elif nnodes == 1:
        rank_name, rank = "default", 0
    else:
        others = "NODE_RANK=1 on the other" if nnodes == 2 else f"1..{nnodes - 1} on the others"
        raise LaunchEnvError(
            f"NODE_RANK is not set but {nnodes_name}={nnodes}: export NODE_RANK=0 on the node at "
            f"MASTER_ADDR and {others}")
    if rank >= nnodes:
        raise LaunchEnvError(
            f"{rank_name}={rank} is out of range for {nnodes_name}={nnodes} (node ranks are 0..{nnodes - 1}): "
            f"fix {rank_name} or raise the node count")
    origin["node_rank"] = rank_name

    # Rendezvous address and port.
    addr_name = next((n for n in ("MASTER_ADDR", "PET_MASTER_ADDR") if _present(env, n)), None)
    if addr_name is not None:
        addr = env[addr_name].strip()
    elif slurm_hosts:
        addr_name, addr = "first host of the SLURM node list", slurm_hosts[0]
    elif nnodes == 1:
        addr_name, addr = "default", "127.0.0.1"
    else:
        raise LaunchEnvError(
            f"MASTER_ADDR is not set but {nnodes_name}={nnodes}: export MASTER_ADDR=<address of the "
            f"node with NODE_RANK=0, reachable from every node>")
    origin["addr"] = addr_name
    port_name = next((n for n in ("MASTER_PORT", "PET_MASTER_PORT") if _present(env, n)), None)
    if port_name is not None:
        port = _int(env, port_name, 1)
    elif slurm and env.get("SLURM_JOB_ID", "").strip().isdigit():
        # Jobs that share a node must not share a port; the job id is the same on every node.
        port_name, port = "SLURM_JOB_ID", 20000 + int(env["SLURM_JOB_ID"]) % 20000
    else:
        port_name, port = "default", DEFAULT_PORT
    if not 1 <= port <= 65535:
        raise LaunchEnvError(f"{port_name}={port} is not a TCP port: use 1024..65535")
    origin["port"] = port_name

    if nnodes_name.startswith("SLURM") or rank_name == "SLURM_NODEID":
        source = "slurm"
    elif nnodes_name.startswith("PET_") or rank_name.startswith("PET_") or k8s_legacy:
        source = "kubernetes"
    elif nnodes_name != "default" or rank_name != "default" or addr_name != "default":
        source = "env"
    else:
        source = "local"
    return Topology(nnodes, rank, nproc, addr, port, source, origin)


# -- the command ----------------------------------------------------------------------------------


def accelerate_executable() -> list[str]:
    """``accelerate`` next to this interpreter (a venv), else ``python -m accelerate.commands.launch``."""
    sibling = Path(sys.executable).with_name("accelerate")
    if sibling.is_file() and os.access(sibling, os.X_OK):
        return [str(sibling), "launch"]
    return [sys.executable, "-m", "accelerate.commands.launch"]


def build_command(topo: Topology, script: str, script_args: Sequence[str] = (),
                  config_file: Optional[str] = None, launcher: Optional[Sequence[str]] = None) -> list[str]:
    """The ``accelerate launch`` argv for this node (command-line values override the config file's)."""
    cmd = list(launcher or accelerate_executable())
    if config_file:
        cmd += ["--config_file", config_file]
    cmd += ["--num_machines", str(topo.num_machines), "--machine_rank", str(topo.machine_rank),
            "--num_processes", str(topo.num_processes), "--main_process_ip", topo.main_process_ip,
            "--main_process_port", str(topo.main_process_port), script, *script_args]
    return cmd


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="htmuon-launch", allow_abbrev=False,  # "--config" must never abbreviate "--config_file"
        description="Start this node's share of a (multi-node) run with accelerate launch, from "
                    "SLURM, Kubernetes PyTorchJob or torchrun-style environment variables. "
                    "Arguments after '--' go to the script.",
        epilog=__doc__.split("\n\n", 2)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_file", default=os.environ.get("HTMUON_ACCELERATE_CONFIG"),
                   help="accelerate config (default $HTMUON_ACCELERATE_CONFIG); num_machines, "
                        "machine_rank, num_processes and the rendezvous in it are overridden")
    p.add_argument("--script", default="launch/train.py",
                   help="training script, relative to the working directory (default launch/train.py)")
    p.add_argument("--dry_run", "--dry-run", action="store_true",
                   default=os.environ.get("HTMUON_DRY_RUN", "").lower() in ("1", "true", "yes"),
                   help="print the command instead of running it (also HTMUON_DRY_RUN=1)")
    return p


def main(argv: Optional[Sequence[str]] = None, env: Optional[Mapping[str, str]] = None) -> int:
    """Resolves the topology, then prints (``--dry_run``) or execs ``accelerate launch``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    own, script_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = _parser()
    args, unknown = parser.parse_known_args(own)
    if unknown:
        parser.error(f"unknown option(s) {' '.join(unknown)}; arguments for the training script go after '--'")
    try:
        topo = resolve_topology(env)
        for path, what in ((args.config_file, "--config_file"), (args.script, "--script")):
            if path and not Path(path).is_file():
                raise LaunchEnvError(
                    f"{what} {path} not found (working directory {os.getcwd()}): run from the "
                    f"repository root (the image's WORKDIR) or pass an existing path")
    except LaunchEnvError as exc:
        print(f"htmuon-launch: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_CONFIG_ERROR
    cmd = build_command(topo, args.script, script_args, args.config_file)
    print(f"htmuon-launch: {topo.describe()}", file=sys.stderr, flush=True)
    if args.dry_run:
        print(shlex.join(cmd), flush=True)
        return 0
    sys.stdout.flush()
    # exec, not a child: signals from SLURM/Kubernetes/docker reach accelerate (and its workers) directly.
    os.execv(cmd[0], cmd)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
