"""Atomic, verified, resumable checkpoints.

Layout of ``output_dir/checkpoints/step_00000100/``:
    (accelerator.save_state)  random_states_<rank>.pkl, and for DDP/DeepSpeed/single-process
                              runs the model and optimizer as Accelerate writes them
    scheduler.json            the LR schedule's state (plain JSON: nothing to unpickle)
    sharded/                  FSDP1/FSDP2 runs: the model, and for FSDP2 the optimizer (HTMuon
                              momentum included), with torch.distributed.checkpoint, one file
                              per rank
    optimizer_rank<r>.pt      FSDP1 runs: rank r's optimizer state (its flat pieces)
    data_state_rank<r>.json   where rank r's token stream stands
    trainer_state.json        step, tokens, model shape, optimizer
    manifest.json             every other file with its size and SHA-256; written last

Atomicity: everything goes to ``.tmp_step_...`` first; the main process writes the manifest and
renames the directory to ``step_...`` after every rank has finished (a directory rename is
atomic on POSIX). A crash mid-save leaves a ``.tmp_`` directory that is ignored (and removed by
the next save), so the previous checkpoint stays the latest. The output directory must be
shared by all nodes.

Integrity: resume verifies the manifest (``--checkpoint_verify sha256``: sizes and checksums,
the files split over the ranks; ``size``: sizes only; ``none``). ``--resume auto`` reports a
damaged newest checkpoint by name and falls back to the newest one that verifies;
``--resume PATH`` on a damaged checkpoint is a configuration error. The checksums detect damage
(truncation, bit rot, a partial copy), not tampering: whoever can write the checkpoint can
rewrite its manifest.

Unpickling: every file this trainer or Accelerate reads back is loaded with
``torch.load(weights_only=True)`` except two that cannot be: DCP's ``sharded/.metadata`` (torch
reads it with ``pickle``) and DeepSpeed's own checkpoint files. Resume only checkpoints you
trust (docs/reliability.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from . import faults
from .common import ConfigError

_STEP_DIR = re.compile(r"^step_(\d{8})$")
STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
SCHEDULER_FILE = "scheduler.json"
VERIFY_MODES = ("sha256", "size", "none")


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoints that finished saving (they have ``trainer_state.json``), oldest first. Whether
    their files are intact is :func:`verify`'s job."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)


def _broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not _distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather_all(obj: Any) -> list[Any]:
    if not _distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _files(directory: Path) -> list[str]:
    """Every regular file under ``directory`` (relative POSIX paths, sorted), the manifest excepted."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if p.is_file() and p.name != MANIFEST)


def write_manifest(directory: Path) -> None:
    """Collective: rank 0 lists the files, every rank hashes every world-th one, rank 0 writes
    ``manifest.json`` (fsync'd). A file is hashed by one rank only, so big checkpoints hash in
    parallel."""
    rank, world = _rank_world()
    names = _broadcast(_files(directory) if rank == 0 else None)
    mine = {n: {"size": (directory / n).stat().st_size, "sha256": sha256_file(directory / n)} for n in names[rank::world]}
    entries: dict[str, Any] = {}
    for part in _gather_all(mine):
        entries.update(part)
    if rank == 0:
        path = directory / MANIFEST
        with open(path, "w") as f:
            json.dump({"version": 1, "files": {n: entries[n] for n in names}}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())


def verify(directory: Path, mode: str = "sha256") -> list[str]:
    """Collective: the problems found in ``directory`` (empty when it is intact). Sizes are
    checked by rank 0 for all files, checksums by every rank for every world-th file."""
    if mode == "none":
        return []
    rank, world = _rank_world()
    problems: list[str] = []
    files: dict[str, Any] = {}
    if rank == 0:
        try:
            files = json.loads((directory / MANIFEST).read_text())["files"]
        except FileNotFoundError:
            problems.append(f"no {MANIFEST} (the save did not finish, or an older htmuon-dist wrote it)")
        except (ValueError, KeyError, TypeError) as e:
            problems.append(f"{MANIFEST} is unreadable ({type(e).__name__})")
        for name, entry in files.items():
            path = directory / name
            if not path.is_file():
                problems.append(f"{name} is missing")
            elif path.stat().st_size != entry["size"]:
                problems.append(f"{name} has {path.stat().st_size} bytes, the manifest says {entry['size']}")
    problems, files = _broadcast((problems, files))
    if mode == "sha256" and not problems:
        names = sorted(files)
        mine = [f"{n} does not match its SHA-256" for n in names[rank::world]
                if sha256_file(directory / n) != files[n]["sha256"]]
        problems = [p for part in _gather_all(mine) for p in part]
    return problems


def save(accelerator, output_dir: str | Path, step: int, model, optimizer, strategy: str,
         data_state: dict[str, Any], trainer_state: dict[str, Any], keep: int, scheduler=None) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    root = checkpoints_dir(output_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp_step_*"):  # left by a crash
            shutil.rmtree(stale, ignore_errors=True)
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
    if faults.dies_mid_save(step):
        os._exit(17)  # tests: die mid-save, after the shards and before the rename
    _barrier()
    if accelerator.is_main_process:
        if scheduler is not None:
            (tmp / SCHEDULER_FILE).write_text(json.dumps(scheduler.state_dict()))
        with open(tmp / STATE_FILE, "w") as f:
            json.dump(trainer_state, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
    _barrier()
    write_manifest(tmp)
    if accelerator.is_main_process:
        if final.exists():  # the same step saved again (a re-run after the end, or it was damaged)
            shutil.rmtree(final)
        os.rename(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def find_resume(output_dir: str | Path, resume: str, verify_mode: str = "sha256",
                report=print) -> Optional[Path]:
    """``auto``: the newest checkpoint that verifies (damaged newer ones are reported through
    ``report`` on rank 0 and skipped), or None when there is none at all; ``never``: None; else
    that directory, which must verify. Collective when distributed.

    Raises:
        ConfigError: ``--resume PATH`` is not a checkpoint or is damaged, or every checkpoint
            in ``output_dir`` is damaged.
    """
    if resume == "never":
        return None
    rank, _ = _rank_world()
    if resume != "auto":
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise ConfigError(f"--resume {resume}: not a complete checkpoint (no {STATE_FILE}); pass a step_* directory or 'auto'")
        problems = verify(path, verify_mode)
        if problems:
            raise ConfigError(
                f"--resume {resume}: the checkpoint is damaged: {'; '.join(problems[:3])}"
                f"{f' (and {len(problems) - 3} more)' if len(problems) > 3 else ''}. Pass an older step_* directory "
                f"or --resume auto (the newest intact one); --checkpoint_verify none skips this check"
            )
        return path
    found = list_checkpoints(output_dir)
    damaged: list[str] = []
    for path in reversed(found):
        problems = verify(path, verify_mode)
        if not problems:
            if damaged and rank == 0:
                report(f"htmuon-train: resuming from {path}, the newest intact checkpoint", flush=True)
            return path
        damaged.append(path.name)
        if rank == 0:
            report(f"htmuon-train: checkpoint {path} is damaged ({'; '.join(problems[:3])}); trying the previous one", flush=True)
    if damaged:
        raise ConfigError(
            f"every checkpoint in {checkpoints_dir(output_dir)} is damaged ({', '.join(damaged)}); restore one, or "
            f"pass --resume never to start over (--checkpoint_verify none resumes without checking)"
        )
    return None


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


def _sharded_state(model, optimizer, strategy: str) -> dict[str, Any]:
    """FSDP2: model and optimizer as DCP state dicts (DTensors, reshardable). FSDP1: the model
    only; FSDP1's optimizer-state gather asserts on padded flat parameters here (torch 2.13,
    CPU), so its optimizer state is saved per rank instead (see :func:`save`)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if strategy == "fsdp1":
        return {"model": get_model_state_dict(model)}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def load(accelerator, path: Path, model, optimizer, strategy: str, scheduler=None) -> dict[str, Any]:
    """Collective: restores RNG, scheduler, model, optimizer; returns this rank's data state.
    Nothing here unpickles arbitrary objects except DCP's metadata (see the module doc)."""
    accelerator.load_state(str(path))  # Accelerate loads with weights_only=True and an allow-list
    if scheduler is not None:
        if (path / SCHEDULER_FILE).is_file():
            scheduler.load_state_dict(json.loads((path / SCHEDULER_FILE).read_text()))
        elif (path / "custom_checkpoint_0.pkl").is_file():  # written before scheduler.json existed
            scheduler.load_state_dict(torch.load(path / "custom_checkpoint_0.pkl", weights_only=True))
    if strategy in ("fsdp1", "fsdp2"):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        state = _sharded_state(model, optimizer, strategy)
        dcp.load(state, checkpoint_id=str(path / "sharded"))
        if strategy == "fsdp1":
            set_model_state_dict(model, state["model"])
            own = torch.load(path / f"optimizer_rank{accelerator.process_index}.pt", weights_only=True)
            optimizer.load_state_dict(own)
        else:
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    data_file = path / f"data_state_rank{accelerator.process_index}.json"
    return json.loads(data_file.read_text())
