"""Every console script and every ``benchmarks/*.py`` answers ``--help``; the console scripts
work from a wheel (model configs shipped as package data), not only from a clone."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
BENCHMARKS = sorted(p.name for p in (REPO / "benchmarks").glob("*.py"))


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_console_script_help(name: str) -> None:
    module, func = SCRIPTS[name].split(":")
    code = f"import sys; sys.argv[0] = {name!r}; from {module} import {func}; sys.exit({func}())"
    proc = subprocess.run([sys.executable, "-c", code, "--help"], cwd=REPO, env=_env(PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("usage:"), proc.stdout[:300]


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_help(name: str) -> None:
    proc = subprocess.run([sys.executable, f"benchmarks/{name}", "--help"], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("usage:"), proc.stdout[:300]


@pytest.mark.slow
def test_wheel_installs_and_finds_model_configs(tmp_path: Path) -> None:
    """Builds the wheel, installs it (no deps) into a fresh venv that sees this environment's
    packages (torch, transformers...) but not this checkout, and runs from outside the repo."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels), str(REPO)], check=True, capture_output=True, timeout=600)
    (wheel,) = wheels.glob("htmuon_dist-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    vpy = venv / "bin" / "python"
    site = Path(subprocess.run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    env = _env()
    env.pop("PYTHONPATH", None)  # a checkout on the path would count as "already installed"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(vpy), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True, timeout=300, env=env, cwd=tmp_path)
    assert (venv / "bin" / "htmuon-train").is_file()
    # then this environment's packages, after the venv's own site-packages (pip would otherwise
    # see this checkout's editable install there); its editable htmuon_dist hook is a .pth file,
    # which a plain path entry does not run
    (site / "outer_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run = tmp_path / "elsewhere"
    run.mkdir()
    proc = subprocess.run([str(venv / "bin" / "htmuon-train"), "--help"], cwd=run, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("usage:") and "htnormuon" in proc.stdout
    code = ("import htmuon_dist; from htmuon_dist.training.config import ModelArguments; "
            "from htmuon_dist.training.model import load_llama_config, model_config_path; "
            "c = load_llama_config(ModelArguments(model='1b')); "
            "print(htmuon_dist.__file__); print(model_config_path('1b')); print(c.hidden_size)")
    proc = subprocess.run([str(vpy), "-c", code], cwd=run, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pkg, cfg, hidden = proc.stdout.split()
    assert pkg.startswith(str(site)) and cfg.startswith(str(site)), (pkg, cfg)
    assert hidden == "2048"
