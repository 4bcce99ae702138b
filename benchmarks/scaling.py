"""Multi-device scaling suite: sharded HTMuon == single-process HTMuon, and what it costs, at W = 1..N.

    python benchmarks/scaling.py                                  # CPU: gloo, W = 1..4, tiny LLaMA
    python benchmarks/scaling.py --device cuda --model 60m        # GPUs: NCCL, W = 1..#GPUs
    python benchmarks/scaling.py --worlds 1,2 --json new.json --compare old.json
    python benchmarks/scaling.py --compare old.json --against new.json   # compare two saved runs

For every W it trains the same model for ``1 + --steps`` optimizer steps on W ranks (each rank a
1/W slice of the same global batch, so the global batch grows with W) and once in one process
on the whole batch, and checks that every parameter agrees to ``--tol`` (relative Frobenius).
The first step builds the exchange plan and is not timed. Per rank and timed step (median):
``step`` = forward + backward + ``opt.step()``, ``opt`` = ``opt.step()`` alone, ``Σ^p`` = the
owner's spectral computation (``opt.engine._compute``, wrapped with a timer; on GPUs with a
device synchronisation around it, which removes the overlap it normally has), plus the bytes
the rank sent for the exchange (``opt.comm_bytes_last_step``) and the plan balance
(max/mean owner cost, ``opt.engine.plan.balance``).

On the CPU the W ranks share this machine's cores, so step times grow with W from contention;
the per-rank ``Σ^p`` column is the work the plan spreads. Output: a table on stdout and, with
``--json``, a file that ``--compare`` reads back (ratios new/old per W). Exit status 1 when a W
fails the equivalence check.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # multirank.py, dist_models.py, tiny_llama.py

import dist_models  # noqa: E402
from multirank import free_port, run_ranks  # noqa: E402

from htmuon_dist import HTMuon, attach_fsdp1, param_groups  # noqa: E402

MAX_CPU_WORLD = 4  # gloo ranks on one machine share its cores; more says nothing about scaling
OPT = dict(lr=0.02, power=0.125, weight_decay=0.1, adamw_lr=3e-3, adamw_weight_decay=0.01)
COMPARED = [("step_s", "step"), ("opt_step_s", "opt.step"), ("spectral_s", "Σ^p"), ("sent_bytes", "bytes")]


# -- model and data (the same on every rank and in the reference) ----------------------------------


def build_model(model: str, seed: int = 0) -> torch.nn.Module:
    """``tiny``: tests/tiny_llama.py (shapes that shard unevenly); else configs/model/<model>.json."""
    if model == "tiny":
        return dist_models.build("llama", seed)
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(model) if model.endswith(".json") else ROOT / "configs" / "model" / f"{model}.json"
    config = LlamaConfig.from_dict({k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")})
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def make_batches(vocab: int, steps: int, global_batch: int, seq: int, seed: int = 0) -> list[torch.Tensor]:
    """One global batch of token ids per step; rank r of W takes rows r*B/W : (r+1)*B/W."""
    g = torch.Generator().manual_seed(seed + 1000)
    return [torch.randint(0, vocab, (global_batch, seq), generator=g) for _ in range(steps)]


def _wrap(model: torch.nn.Module, backend: str, device: torch.device) -> torch.nn.Module:
    if backend == "fsdp1" and device.type == "cuda":  # dist_models pins FSDP1 to the CPU
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        return FSDP(model, use_orig_params=True, device_id=device, auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}))
    return dist_models.wrap(model, "llama", backend)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- one W ----------------------------------------------------------------------------------------


def reference(model_name: str, world: int, steps: int, per_rank: int, seq: int, device: str) -> dict[str, torch.Tensor]:
    """The single-process run on the whole global batch (the definition sharded runs must match)."""
    dev = torch.device(device)
    model = build_model(model_name).to(dev)
    opt = HTMuon(param_groups(model, "reference"), **OPT, process_group=None)
    for x in make_batches(model.config.vocab_size, steps, per_rank * world, seq):
        model(input_ids=x.to(dev), labels=x.to(dev)).loss.backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters()}


def _worker(rank: int, world: int, model_name: str, backend: str, steps: int, per_rank: int, seq: int,
            device: str, nccl_port: Optional[int]) -> dict[str, Any]:
    """One rank: build, shard, train ``steps`` steps (the first untimed), report timings and state."""
    import torch.distributed as dist

    if device == "cuda":
        # run_ranks starts a gloo group; CUDA tensors need NCCL, so rejoin on a fresh port with both.
        dist.destroy_process_group()
        os.environ["MASTER_PORT"] = str(nccl_port)
        torch.cuda.set_device(rank)
        dist.init_process_group("cpu:gloo,cuda:nccl", rank=rank, world_size=world,
                                device_id=torch.device("cuda", rank))
    dev = torch.device("cuda", rank) if device == "cuda" else torch.device("cpu")
    model = build_model(model_name).to(dev)
    groups = param_groups(model, "reference")  # before wrapping: FSDP1 flattens shapes away
    wrapped = _wrap(model, backend, dev)
    if backend == "fsdp2":  # fully_shard swapped in DTensors
        groups = param_groups(model, "reference")
    opt = HTMuon(groups, **OPT)
    if backend == "fsdp1":
        attach_fsdp1(opt, wrapped)

    spectral: list[float] = []
    wrapped_engine = None

    def instrument() -> None:
        nonlocal wrapped_engine
        engine = opt.engine
        if engine is None or engine is wrapped_engine:
            return
        inner = engine._compute

        def timed(*a: Any, **k: Any) -> Any:
            _sync(dev)
            start = time.perf_counter()
            out = inner(*a, **k)
            _sync(dev)
            spectral.append(time.perf_counter() - start)
            return out

        engine._compute = timed  # type: ignore[method-assign]
        wrapped_engine = engine

    step_s, opt_s, spec_s, sent = [], [], [], []
    lo, hi = rank * per_rank, (rank + 1) * per_rank
    for i, x in enumerate(make_batches(model.config.vocab_size, steps, per_rank * world, seq)):
        x = x[lo:hi].to(dev)
        if world > 1:
            dist.barrier()
        _sync(dev)
        t0 = time.perf_counter()
        wrapped(input_ids=x, labels=x).loss.backward()
        _sync(dev)
        t1 = time.perf_counter()
        spectral.clear()
        opt.step()
        _sync(dev)
        t2 = time.perf_counter()
        opt.zero_grad()
        instrument()  # after step 1 (the engine exists from then on); later steps are timed
        if i == 0:
            continue
        step_s.append(t2 - t0)
        opt_s.append(t2 - t1)
        spec_s.append(sum(spectral))
        sent.append(opt.comm_bytes_last_step)
    engine = opt.engine
    return {
        # On the CPU before pickling: the parent must not allocate on this rank's GPU.
        "params": {n: t.cpu() for n, t in dist_models.full_state(wrapped, backend).items()},
        "step_s": statistics.median(step_s),
        "opt_step_s": statistics.median(opt_s),
        "spectral_s": statistics.median(spec_s),
        "sent_bytes": sent[-1],
        "sent_stable": len(set(sent)) == 1,
        "owned": sum(1 for o in engine.plan.owners if o == rank),
        "matrices": len(engine.plan.owners),
        "balance": float(engine.plan.balance),
        "backend_detected": opt.backend,
        "checksum": engine.plan.checksum(),
    }


def max_rel_err(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """Worst per-parameter relative Frobenius error (inf if the parameter sets differ)."""
    if set(got) != set(want):
        return float("inf")
    return max(float((got[n].double() - want[n].double()).norm() / want[n].double().norm().clamp_min(1e-30))
               for n in want)


def run_world(args: argparse.Namespace, world: int) -> dict[str, Any]:
    steps = args.steps + 1
    want = reference(args.model, world, steps, args.batch_per_rank, args.seq, args.device)
    nccl_port = free_port() if args.device == "cuda" else None
    ranks = run_ranks(_worker, world, args.model, args.backend, steps, args.batch_per_rank, args.seq,
                      args.device, nccl_port, timeout=args.timeout)
    errors = [max_rel_err(r.pop("params"), want) for r in ranks]
    agree = len({r.pop("checksum") for r in ranks}) == 1
    worst = max(errors)
    return {
        "world": world,
        "max_rel_err": worst,
        "ok": worst <= args.tol and agree and all(r["sent_stable"] for r in ranks),
        "plans_agree": agree,
        "balance": ranks[0]["balance"],
        "matrices": ranks[0]["matrices"],
        "backend_detected": ranks[0]["backend_detected"],
        "step_s_max": max(r["step_s"] for r in ranks),
        "spectral_s_max": max(r["spectral_s"] for r in ranks),
        "sent_bytes_total": sum(r["sent_bytes"] for r in ranks),
        "ranks": [{"rank": i, **{k: r[k] for k in ("step_s", "opt_step_s", "spectral_s", "sent_bytes", "owned")}}
                  for i, r in enumerate(ranks)],
    }


# -- output ---------------------------------------------------------------------------------------


def print_table(report: dict[str, Any]) -> None:
    m = report["meta"]
    print(f"scaling: model {m['model']} ({m['parameters'] / 1e6:.2f}M params), backend {m['backend']}, "
          f"device {m['device_name']}, {m['steps']} timed steps (median), batch {m['batch_per_rank']}x{m['seq']} "
          f"per rank, tol {m['tol']:g}")
    print(f"{'W':>3} {'rank':>4} {'owned':>5} {'step ms':>9} {'opt ms':>9} {'Σ^p ms':>8} {'KB sent':>9} "
          f"{'balance':>7} {'max rel err':>11} {'equal':>5}")
    for r in report["results"]:
        for p in r["ranks"]:
            print(f"{r['world']:>3} {p['rank']:>4} {p['owned']:>5} {p['step_s'] * 1e3:>9.1f} {p['opt_step_s'] * 1e3:>9.1f} "
                  f"{p['spectral_s'] * 1e3:>8.1f} {p['sent_bytes'] / 1e3:>9.1f}")
        print(f"{r['world']:>3} {'max':>4} {r['matrices']:>5} {r['step_s_max'] * 1e3:>9.1f} {'':>9} "
              f"{r['spectral_s_max'] * 1e3:>8.1f} {r['sent_bytes_total'] / 1e3:>9.1f} {r['balance']:>7.3f} "
              f"{r['max_rel_err']:>11.2e} {'yes' if r['ok'] else 'NO':>5}")
    print("(owned/max: matrices owned / in the plan; KB sent/max: summed over ranks)")


def compare(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Lines of new/old ratios per W present in both (> 1: slower or more bytes in the new run)."""
    lines = []
    keys = ("model", "backend", "device_name", "batch_per_rank", "seq")
    differ = [f"{k}: {old['meta'].get(k)} -> {new['meta'].get(k)}" for k in keys if old["meta"].get(k) != new["meta"].get(k)]
    if differ:
        lines.append("warning: the runs differ in " + "; ".join(differ))
    lines.append(f"{'W':>3} {'step max':>9} {'Σ^p max':>8} {'bytes':>7} {'balance':>8} {'equal old/new':>13}")
    old_by_w = {r["world"]: r for r in old["results"]}
    for r in new["results"]:
        o = old_by_w.get(r["world"])
        if o is None:
            lines.append(f"{r['world']:>3} (not in the old run)")
            continue

        def ratio(key: str) -> str:
            return f"{r[key] / o[key]:.2f}" if o[key] else ("1.00" if r[key] == o[key] else "new>0")

        lines.append(f"{r['world']:>3} {ratio('step_s_max'):>9} {ratio('spectral_s_max'):>8} {ratio('sent_bytes_total'):>7} "
                     f"{ratio('balance'):>8} {('yes' if o['ok'] else 'NO') + '/' + ('yes' if r['ok'] else 'NO'):>13}")
    return lines


def _meta(args: argparse.Namespace) -> dict[str, Any]:
    model = build_model(args.model)
    if args.device == "cuda":
        name = f"{torch.cuda.get_device_name(0)} (NCCL)"
    else:
        name = f"{platform.processor() or platform.machine()} x{os.cpu_count()} cores (gloo)"
    return {"model": args.model, "parameters": sum(p.numel() for p in model.parameters()), "backend": args.backend,
            "device": args.device, "device_name": name, "steps": args.steps, "batch_per_rank": args.batch_per_rank,
            "seq": args.seq, "tol": args.tol, "worlds": args.worlds, "torch": torch.__version__,
            "host": socket.gethostname(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--worlds", type=lambda s: [int(x) for x in s.split(",")],
                   help="world sizes (default 1..N: N = #GPUs, or 4 on the CPU)")
    p.add_argument("--backend", choices=["fsdp2", "fsdp1", "ddp"], default="fsdp2")
    p.add_argument("--model", default="tiny", help="tiny (tests/tiny_llama.py) or a configs/model name / JSON path")
    p.add_argument("--steps", type=int, default=3, help="timed steps (one untimed step comes first)")
    p.add_argument("--batch_per_rank", type=int, default=2)
    p.add_argument("--seq", type=int, default=12)
    p.add_argument("--tol", type=float, help="relative tolerance (default 1e-5 on the CPU, 1e-4 on GPUs)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per W before the ranks are killed")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--compare", metavar="OLD_JSON", help="print new/old ratios against this earlier run")
    p.add_argument("--against", metavar="NEW_JSON", help="with --compare: compare this saved run instead of running")
    args = p.parse_args(argv)
    if args.against and not args.compare:
        p.error("--against needs --compare OLD_JSON")
    if args.against:
        return args
    if args.device == "cuda":
        gpus = torch.cuda.device_count()
        if gpus < 1:
            p.error("--device cuda but no GPU is visible")
        args.worlds = args.worlds or list(range(1, gpus + 1))
        if max(args.worlds) > gpus:
            p.error(f"--worlds {max(args.worlds)} > {gpus} visible GPUs (one rank per GPU)")
    else:
        args.worlds = args.worlds or list(range(1, MAX_CPU_WORLD + 1))
        if max(args.worlds) > MAX_CPU_WORLD:
            p.error(f"CPU runs use at most {MAX_CPU_WORLD} gloo ranks (they share this machine's cores)")
    if min(args.worlds) < 1 or args.steps < 1:
        p.error("world sizes and --steps must be >= 1")
    args.tol = args.tol if args.tol is not None else (1e-4 if args.device == "cuda" else 1e-5)
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.against:
        new = json.loads(Path(args.against).read_text())
    else:
        new = {"meta": _meta(args), "results": []}
        for world in args.worlds:
            new["results"].append(run_world(args, world))
        print_table(new)
        if args.json:
            Path(args.json).write_text(json.dumps(new, indent=1) + "\n")
            print(f"wrote {args.json}")
    if args.compare:
        print(f"new / old ({args.compare}):")
        print("\n".join(compare(json.loads(Path(args.compare).read_text()), new)))
    return 0 if all(r["ok"] for r in new["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
