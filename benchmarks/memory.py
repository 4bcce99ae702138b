"""The step's memory, measured against its contract and against AdamW.

    python benchmarks/memory.py                              # everything below, CPU
    python benchmarks/memory.py --layers 1b,7b --world 1,2   # layer sets only
    python benchmarks/memory.py --train 350m --world 2       # one FSDP2 training step, HTMuon vs AdamW
    python benchmarks/memory.py --layers 7b --world 1 --device cuda --json out.json

Layer sets (``--layers``): the matrices of one LLaMA decoder layer plus its LM head, as FSDP2
(``Shard(0)`` DTensors) over W gloo ranks (NCCL on CUDA), all routed to HTMuon with default
settings and state already created. One ``opt.step()`` is measured per rank:
  * CPU: peak RSS above the RSS before the step (``/proc/self/clear_refs`` resets the high-water
    mark), and the CPU allocator's own peak of live bytes (torch.profiler memory records);
  * CUDA: ``max_memory_allocated`` above ``memory_allocated`` before the step;
against ``HTMuon.memory_bound()`` (the contract of docs/distributed.md, computed from the plan)
and the acceptance bar of the scale-ready issue, 4 x the largest matrix (fp32) + 256 MiB.

Training steps (``--train``): a LLaMA built by the trainer's own functions, FSDP2 over W gloo
ranks, batch 2 x 64 tokens per rank, ``--train-steps`` (default 3) steps of forward + backward +
``clip_grad_norm`` + ``opt.step()`` + ``zero_grad`` with the trainer's HTMuon and with its AdamW
(``torch.optim.AdamW``), each in its own processes; per rank the process's peak RSS (VmHWM)
over all steps, after each step, the last step's peaks of its forward + backward and of its
optimizer step apart (the high-water mark is reset at each), and its times. One step is not enough: the first
step creates the optimizer state, and AdamW's peak rises by about 1.3 GiB at 350M in the
second (benchmarks/results/memory_cpu.txt). Each rank sets glibc's mmap threshold as the trainer
does (``--malloc_mmap_threshold``, training/memory.py: 1 MiB from 100M parameters up), without
which both peaks are ~0.7 GiB higher from freed heap glibc keeps. The trainer's ``/usr/bin/time -v`` maximum adds
what follows the steps (evaluation, the final checkpoint, the export's full state dict on
rank 0); with ``--save_steps 0 --export_model false`` it measures the steps as this does.

Prints a table; ``--json`` writes ``{"rows": [...]}`` with, per row, ``case``, ``peak_bytes``,
``bound_bytes`` and ``ok`` (peak <= bound). Exit status 1 if a layer-set row exceeds its bound.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # multirank.py: spawned gloo ranks

from memtrack import allocator_peak  # noqa: E402
from multirank import run_ranks  # noqa: E402

MiB = 1 << 20
# (rows, cols) of one decoder layer's matrices + the LM head (vocab 32000).
LAYER_SETS = {
    "1b": [(2048, 2048)] * 4 + [(5461, 2048)] * 2 + [(2048, 5461), (32000, 2048)],
    "7b": [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008), (32000, 4096)],
    "tiny": [(64, 64)] * 4 + [(172, 64)] * 2 + [(64, 172), (1000, 64)],
}


def _status(field: str) -> int:
    """A /proc/self/status size field (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def layer_set_worker(rank: int, world: int, name: str, device: str, method: str) -> dict[str, Any]:
    """One measured HTMuon step on ``name``'s matrices, row-sharded over ``world`` ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    from htmuon_dist import HTMuon
    from htmuon_dist.optimizer import METHOD_STATE
    from htmuon_dist.spectral import get_method

    dev = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
    mesh = init_device_mesh(device, (world,)) if world > 1 else None
    g = torch.Generator(device=dev).manual_seed(rank)

    def make(shape):
        if mesh is None:
            return torch.randn(shape, generator=g, device=dev) * 0.02
        # each rank draws only its own rows (Shard(0)'s ceil split): no rank holds a whole matrix
        rows = -(-shape[0] // world)
        lo, hi = min(rank * rows, shape[0]), min((rank + 1) * rows, shape[0])
        local = torch.randn((hi - lo, shape[1]), generator=g, device=dev) * 0.02
        return DTensor.from_local(local, mesh, [Shard(0)], run_check=False,
                                  shape=torch.Size(shape), stride=(shape[1], 1))

    shapes = LAYER_SETS[name]
    params = [torch.nn.Parameter(make(s)) for s in shapes]
    names = [f"{name}.{i}.{m}x{n}" for i, (m, n) in enumerate(shapes)]
    opt = HTMuon([{"params": params, "param_names": names, "htmuon": True}], method=method)
    stateful = get_method(method).stateful is not None
    for p in params:  # the state a first step would have created
        opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
        opt.state[p]["step"] = torch.tensor(0.0)
        if stateful:  # e.g. stream's basis, float32 and shaped like the parameter
            opt.state[p][METHOD_STATE] = torch.zeros_like(p, dtype=torch.float32)
        p.grad = make(p.shape)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        opt.step()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak, alloc_peak = torch.cuda.max_memory_allocated() - before, None
    else:
        _reset_peak_rss()
        before = _status("VmRSS")
        t0 = time.perf_counter()
        alloc_peak = allocator_peak(opt.step)
        seconds = time.perf_counter() - t0
        peak = _status("VmHWM") - before
    largest = max(m * n for m, n in shapes) * 4
    return dict(case=f"layers {name}", world=world, rank=rank, device=device, method=method,
                largest_bytes=largest, peak_bytes=peak, allocator_peak_bytes=alloc_peak,
                bound_bytes=opt.memory_bound(), bar_bytes=4 * largest + 256 * MiB,
                step_s=seconds, buckets=len(opt.engine.plan.buckets))


def train_step_worker(rank: int, world: int, model: str, optimizer: str, steps: int) -> dict[str, Any]:
    """``steps`` FSDP2 training steps of ``model`` built, clipped and optimised as the trainer does
    (forward + backward, ``clip_grad_norm``, ``opt.step()``, ``zero_grad(set_to_none=True)``).

    The process's peak RSS (VmHWM) is read after every step: the first step is not the steady
    state (AdamW's two moments and HTMuon's momentum are created inside it, from memory the
    backward has just freed), so the figure is the peak over all steps, as ``/usr/bin/time -v``
    reports for a training run."""
    from htmuon_dist.training.config import ModelArguments, TrainArguments
    from htmuon_dist.training.memory import mmap_threshold_for, set_mmap_threshold
    from htmuon_dist.training.model import build_model, count_parameters, load_llama_config, materialize
    from htmuon_dist.training.optim import build_optimizer, matrix_names
    from htmuon_dist.training.parallel import apply_fsdp2, clip_grad_norm

    torch.manual_seed(0)
    cfg = load_llama_config(ModelArguments(model=model))
    t = TrainArguments(optimizer=optimizer, lr=1e-3, adamw_lr=1e-3, power=0.125,
                       spectral_method="eigh" if optimizer != "adamw" else None)
    # the trainer's allocator setting (training/memory.py), before any weight exists
    threshold = mmap_threshold_for(t.malloc_mmap_threshold, count_parameters(cfg))
    set_mmap_threshold(threshold)
    net = build_model(cfg, on_meta=True, activation_checkpointing=False)
    routed = matrix_names(net, "reference")
    net = apply_fsdp2(net, torch.device("cpu"), False, True)
    materialize(net, torch.device("cpu"), 0, 0.02)
    opt = build_optimizer(net, t, routed)
    gen = torch.Generator().manual_seed(rank)
    fwd_bwd, opt_step, peaks = [], [], []
    # the high-water mark is reset at each phase, so the peak of each is seen apart
    peak, bwd_peak, step_peak = _status("VmHWM"), 0, 0
    for _ in range(steps):
        ids = torch.randint(0, cfg.vocab_size, (2, 64), generator=gen)
        _reset_peak_rss()
        t0 = time.perf_counter()
        net(input_ids=ids, labels=ids).loss.backward()
        t1 = time.perf_counter()
        bwd_peak = _status("VmHWM")
        _reset_peak_rss()
        clip_grad_norm(net, "fsdp2", 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        step_peak = _status("VmHWM")
        fwd_bwd.append(t1 - t0)
        opt_step.append(t2 - t1)
        peak = max(peak, bwd_peak, step_peak)
        peaks.append(peak)
    return dict(case=f"train {model} fsdp2", world=world, rank=rank, optimizer=optimizer, steps=steps,
                peak_rss_bytes=peaks[-1], peak_rss_after_step=peaks, mmap_threshold=threshold,
                fwd_bwd_s=fwd_bwd[-1], opt_step_s=opt_step[-1],
                last_fwd_bwd_peak_bytes=bwd_peak, last_step_peak_bytes=step_peak,
                bound_bytes=opt.memory_bound() if hasattr(opt, "memory_bound") else None)


def _gib(b) -> str:
    return "-" if b is None else f"{b / (1 << 30):.2f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--layers", default="1b,7b", help="comma list of layer sets (1b, 7b, tiny) or 'none'")
    ap.add_argument("--world", default="1,2", help="comma list of world sizes for the layer sets")
    ap.add_argument("--train", default="350m", help="comma list of models for the FSDP2 training step, or 'none'")
    ap.add_argument("--train-world", type=int, default=2, help="ranks of the training step (FSDP2)")
    ap.add_argument("--train-steps", type=int, default=3,
                    help="steps of the training case (>= 2: the first step is not the steady state)")
    ap.add_argument("--train-optimizers", default="htmuon,adamw", help="optimizers compared in the training step")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--method", default="eigh", help="spectral method of the layer sets (default: the optimizer's)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per case before its ranks are killed")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("memory.py: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows: list[dict[str, Any]] = []
    failed = False
    if args.layers != "none":
        print(f"{'layer set':10} {'W':>2} {'rank':>4} {'largest':>8} {'peak':>8} {'alloc':>8} "
              f"{'contract':>8} {'bar':>8} {'step s':>7}  (GiB above params+grads+state)")
        for name in args.layers.split(","):
            for world in (int(w) for w in args.world.split(",")):
                if args.device == "cuda" and world > torch.cuda.device_count():
                    print(f"{name:10} {world:>2}  skipped: {torch.cuda.device_count()} GPU(s)")
                    continue
                if args.device == "cuda" and world == 1:
                    results = [layer_set_worker(0, 1, name, "cuda", args.method)]
                else:
                    results = run_ranks(layer_set_worker, world, name, args.device, args.method,
                                        timeout=args.timeout, pg_timeout=args.timeout)
                for r in results:
                    r["ok"] = r["peak_bytes"] <= r["bound_bytes"] and r["peak_bytes"] <= r["bar_bytes"]
                    failed |= not r["ok"]
                    rows.append(r)
                    print(f"{name:10} {world:>2} {r['rank']:>4} {_gib(r['largest_bytes']):>8} "
                          f"{_gib(r['peak_bytes']):>8} {_gib(r['allocator_peak_bytes']):>8} "
                          f"{_gib(r['bound_bytes']):>8} {_gib(r['bar_bytes']):>8} {r['step_s']:7.1f}"
                          f"  {'ok' if r['ok'] else 'OVER'}")
    if args.train != "none" and args.device == "cpu":
        print(f"\n{'training steps':16} {'optimizer':9} {'rank':>4} {'peak RSS':>9} {'fwd+bwd s':>9} "
              f"{'opt.step s':>10} {'last fwd+bwd peak':>17} {'last step peak':>14}  "
              f"peak RSS after each of {args.train_steps} steps (GiB)")
        for model in args.train.split(","):
            peaks = {}
            for optimizer in args.train_optimizers.split(","):
                try:
                    results = run_ranks(train_step_worker, args.train_world, model, optimizer,
                                        args.train_steps, timeout=args.timeout, pg_timeout=args.timeout)
                except (AssertionError, TimeoutError) as e:  # e.g. the kernel's OOM killer
                    print(f"{model + ' x' + str(args.train_world):16} {optimizer:9} did not finish: "
                          f"{str(e).splitlines()[0]} (exit -9 is the OOM killer)")
                    rows.append(dict(case=f"train {model} fsdp2", world=args.train_world,
                                     optimizer=optimizer, failed=str(e), ok=False, peak_bytes=None))
                    continue
                peaks[optimizer] = max(r["peak_rss_bytes"] for r in results)
                for r in results:
                    r["peak_bytes"] = r["peak_rss_bytes"]
                    r["ok"] = True
                    rows.append(r)
                    print(f"{model + ' x' + str(args.train_world):16} {optimizer:9} {r['rank']:>4} "
                          f"{_gib(r['peak_rss_bytes']):>9} {r['fwd_bwd_s']:9.1f} {r['opt_step_s']:10.1f} "
                          f"{_gib(r['last_fwd_bwd_peak_bytes']):>17} {_gib(r['last_step_peak_bytes']):>14}  "
                          + " ".join(_gib(b) for b in r["peak_rss_after_step"]))
            if "htmuon" in peaks and "adamw" in peaks:
                verdict = "<=" if peaks["htmuon"] <= peaks["adamw"] else ">"
                print(f"largest rank: HTMuon {_gib(peaks['htmuon'])} GiB {verdict} AdamW "
                      f"{_gib(peaks['adamw'])} GiB (HTMuon {(peaks['adamw'] - peaks['htmuon']) / (1 << 30):+.2f} GiB below)")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
