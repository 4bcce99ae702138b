"""Atomic, resumable checkpoints.

Layout of ``output_dir/checkpoints/step_00000100/``:
    (accelerator.save_state)  random_states_<rank>.pkl, custom_checkpoint_0.pkl (the LR
                              scheduler), and for DDP/DeepSpeed/single-process runs the model and
                              optimizer as Accelerate writes them
    sharded/                  FSDP1/FSDP2 runs: the model, and for FSDP2 the optimizer (HTMuon
                              momentum included), with torch.distributed.checkpoint, one file
                              per rank
    optimizer_rank<r>.pt      FSDP1 runs: rank r's optimizer state (its flat pieces)
    data_state_rank<r>.json   where rank r's token stream stands
    trainer_state.json        step, tokens, model shape, optimizer; written last

Atomicity: everything goes to ``.tmp_step_...`` first; the main process renames it to
``step_...`` after every rank has finished (a directory rename is atomic on POSIX). A crash
mid-save leaves a ``.tmp_`` directory that is ignored (and removed by the next save), so the
previous checkpoint stays the latest. The output directory must be shared by all nodes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from .config import ConfigError

_STEP_DIR = re.compile(r"^step_(\d{8})$")
STATE_FILE = "trainer_state.json"


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (they have ``trainer_state.json``), oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _sharded_state(model, optimizer, strategy: str) -> dict[str, Any]:
    """FSDP2: model and optimizer as DCP state dicts (DTensors, reshardable). FSDP1: the model
    only; FSDP1's optimizer-state gather asserts on padded flat parameters here (torch 2.13,
    CPU), so its optimizer state is saved per rank instead (see :func:`save`)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if strategy == "fsdp1":
        return {"model": get_model_state_dict(model)}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def save(accelerator, output_dir: str | Path, step: int, model, optimizer, strategy: str,
         data_state: dict[str, Any], trainer_state: dict[str, Any], keep: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    root = checkpoints_dir(output_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp_step_*"):  # left by a crash
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # the same step saved again (e.g. a re-run after the end)
            shutil.rmtree(final)
        tmp.mkdir()
    _barrier()
    accelerator.save_state(str(tmp))
    rank = accelerator.process_index
    if strategy in ("fsdp1", "fsdp2"):
        import torch.distributed.checkpoint as dcp

        dcp.save(_sharded_state(model, optimizer, strategy), checkpoint_id=str(tmp / "sharded"))
        if strategy == "fsdp1":
            torch.save(optimizer.state_dict(), tmp / f"optimizer_rank{rank}.pt")
    (tmp / f"data_state_rank{rank}.json").write_text(json.dumps(data_state))
    if os.environ.get("HTMUON_FAULT_INJECT") == f"save:{step}":
        os._exit(17)  # tests: die mid-save, after the shards and before the rename
    _barrier()
    if accelerator.is_main_process:
        state_path = tmp / STATE_FILE
        with open(state_path, "w") as f:
            json.dump(trainer_state, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def find_resume(output_dir: str | Path, resume: str) -> Optional[Path]:
    """``auto``: the latest complete checkpoint or None; ``never``: None; else that directory."""
    if resume == "never":
        return None
    if resume == "auto":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"--resume {resume}: not a complete checkpoint (no {STATE_FILE}); pass a step_* directory or 'auto'")
    return path


def check_compatible(path: Path, expected: dict[str, Any]) -> dict[str, Any]:
    """Reads ``trainer_state.json`` and refuses checkpoints of another model/optimizer/layout."""
    state = json.loads((path / STATE_FILE).read_text())
    problems = []
    if state.get("model") != expected["model"]:
        problems.append(f"model {state.get('model')} != this run's {expected['model']}")
    for key in ("optimizer", "checkpoint_format", "world_size"):
        if state.get(key) != expected[key]:
            problems.append(f"{key} {state.get(key)!r} != this run's {expected[key]!r}")
    if problems:
        raise ConfigError(
            f"cannot resume from {path}: " + "; ".join(problems) + ". Use a new --output_dir, pass "
            f"--resume never to start over, or rerun with the checkpoint's settings"
        )
    return state


def load(accelerator, path: Path, model, optimizer, strategy: str) -> dict[str, Any]:
    """Collective: restores RNG, scheduler, model, optimizer; returns this rank's data state."""
    accelerator.load_state(str(path))
    if strategy in ("fsdp1", "fsdp2"):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        state = _sharded_state(model, optimizer, strategy)
        dcp.load(state, checkpoint_id=str(path / "sharded"))
        if strategy == "fsdp1":
            set_model_state_dict(model, state["model"])
            own = torch.load(path / f"optimizer_rank{accelerator.process_index}.pt", weights_only=False)
            optimizer.load_state_dict(own)
        else:
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    data_file = path / f"data_state_rank{accelerator.process_index}.json"
    return json.loads(data_file.read_text())
