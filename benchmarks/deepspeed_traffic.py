"""Bytes sent per rank per optimizer step under DeepSpeed ZeRO: HTMuon vs DeepSpeed's Muon.

    DS_ACCELERATOR=cpu python benchmarks/deepspeed_traffic.py [--world 2] [--hidden 128]
        [--layers 2] [--ffn 344] [--vocab 512] [--steps 3]

One launch spawns W gloo ranks (CPU, DeepSpeed's CPU accelerator) and, one after another on
the same process group, trains the same LLaMA with:
  zero2  AdamW (torch, client)      - the ZeRO-2 baseline: gradient reduce-scatter + all-gather
  zero2  HTMuon (client)            - baseline + HTMuon's all_to_all exchange
  zero2  DeepSpeed Muon ("optimizer": {"type": "Muon"})
  zero3  AdamW, HTMuon, DeepSpeed Muon (reduce_scatter off: DeepSpeed's Muon refuses it)
Every torch.distributed collective is wrapped to count the bytes this rank sends, with the
usual ring costs for W ranks and n bytes of payload: all_reduce 2(W-1)/W·n, reduce_scatter,
all_gather and reduce (W-1)/W·n of the full tensor, all_to_all the bytes addressed to other
ranks, broadcast n on the source (send/isend/gather/scatter: their payload). The numbers are the last (steady) step, averaged over ranks; the
"extra" column is the step minus the same stage's AdamW step. Routing: DeepSpeed's Muon
convention for both (hidden matrices -> Muon/HTMuon; embeddings, head, norms -> Adam).
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import os
import socket
import sys
import tempfile
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

_COUNT = {"bytes": 0}


def _nbytes(t) -> int:
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _install_counters() -> None:
    """Wraps the torch.distributed collectives that DeepSpeed and HTMuon call; arguments are
    bound by name, since DeepSpeed passes some of them as keywords."""
    def first_tensor(a: dict, *names: str) -> int:
        for n in names:
            if a.get(n) is not None:
                return _nbytes(a[n])
        return 0

    def a2a(a: dict, w: int) -> int:
        inp, splits = a["input"], a.get("input_split_sizes")
        me = dist.get_rank(a.get("group"))
        if splits:
            per = inp.element_size() * (inp[0].numel() if inp.dim() > 1 else 1)
            return sum(s for r, s in enumerate(splits) if r != me) * per
        return int((w - 1) / w * _nbytes(inp))

    costs = {  # bytes this rank sends, ring algorithms
        "all_reduce": lambda a, w: int(2 * (w - 1) / w * first_tensor(a, "tensor")),
        "all_gather_into_tensor": lambda a, w: int((w - 1) / w * first_tensor(a, "output_tensor")),
        "_all_gather_base": lambda a, w: int((w - 1) / w * first_tensor(a, "output_tensor")),
        "all_gather": lambda a, w: (w - 1) * first_tensor(a, "tensor"),
        "reduce_scatter_tensor": lambda a, w: int((w - 1) / w * first_tensor(a, "input")),
        "_reduce_scatter_base": lambda a, w: int((w - 1) / w * first_tensor(a, "input")),
        "reduce_scatter": lambda a, w: int((w - 1) / w * first_tensor(a, "input_list")),
        "all_to_all_single": a2a,
        "broadcast": lambda a, w: first_tensor(a, "tensor") if dist.get_rank() == a.get("src", 0) else 0,
        "reduce": lambda a, w: int((w - 1) / w * first_tensor(a, "tensor")),
        "gather": lambda a, w: 0 if dist.get_rank() == a.get("dst", 0) else first_tensor(a, "tensor"),
        "scatter": lambda a, w: ((w - 1) * first_tensor(a, "tensor")
                                 if dist.get_rank() == a.get("src", 0) else 0),
        "send": lambda a, w: first_tensor(a, "tensor"),
        "isend": lambda a, w: first_tensor(a, "tensor"),
    }
    for name, cost in costs.items():
        original = getattr(dist, name, None)
        if original is None:
            continue
        signature = inspect.signature(original)

        def wrapped(*args, _orig=original, _cost=cost, _sig=signature, _name=name, **kwargs):
            bound = _sig.bind(*args, **kwargs)
            bound.apply_defaults()
            w = dist.get_world_size(bound.arguments.get("group"))
            if w > 1:
                nbytes = _cost(bound.arguments, w)
                _COUNT["bytes"] += nbytes
                _COUNT[_name] = _COUNT.get(_name, 0) + nbytes
            return _orig(*args, **kwargs)

        setattr(dist, name, wrapped)


def _model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                      num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 32),
                      num_key_value_heads=max(1, args.hidden // 32), max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).float()


def _run(kind: str, stage: int, args, rank: int, world: int) -> tuple[int, int]:
    """Trains args.steps steps; returns (bytes this rank sent in the last step, HTMuon's own
    count of its exchange bytes in that step (0 for the others), MB per collective)."""
    import deepspeed

    from htmuon_dist import HTMuon, param_groups

    model = _model(args)
    zero = {"stage": stage, "reduce_scatter": True, "overlap_comm": False}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
           "zero_optimization": zero, "zero_allow_untested_optimizer": True,
           "gradient_clipping": 0.0, "steps_per_print": 10**9}
    optimizer = None
    if kind == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    elif kind == "htmuon":
        optimizer = HTMuon(param_groups(model, "muon"), lr=0.02, adamw_lr=1e-3)
    else:
        cfg["optimizer"] = {"type": "Muon", "params": {"lr": 0.02, "momentum": 0.95}}
        if stage == 3:
            zero["reduce_scatter"] = False  # DeepSpeed's Muon refuses reduce_scatter at ZeRO-3
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg)
    g = torch.Generator().manual_seed(rank)
    sent = own = 0
    for _ in range(args.steps):
        x = torch.randint(0, args.vocab, (2, 16), generator=g)
        _COUNT.clear()
        _COUNT["bytes"] = 0
        engine.backward(engine(input_ids=x, labels=x).loss)
        engine.step()
        sent = _COUNT["bytes"]
        own = optimizer.comm_bytes_last_step if kind == "htmuon" else 0
        by_op = ", ".join(f"{k} {v / 1e6:.3f}" for k, v in sorted(_COUNT.items()) if k != "bytes" and v)
    dist.barrier()
    return sent, own, by_op


def _worker(rank: int, world: int, port: int, args, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    import faulthandler
    faulthandler.dump_traceback_later(int(os.environ.get("TRAFFIC_DUMP_AFTER", "0")) or 10**6)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    _install_counters()
    rows = []
    for stage in (2, 3):
        for kind in ("adamw", "htmuon", "muon"):
            try:
                rows.append((stage, kind, *_run(kind, stage, args, rank, world), ""))
            except Exception as exc:  # noqa: BLE001 - report, do not hide
                traceback.print_exc()
                rows.append((stage, kind, -1, 0, "", f"{type(exc).__name__}: {str(exc)[:120]}"))
    torch.save(rows, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--ffn", type=int, default=344)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(args.world, port, args, out_dir), nprocs=args.world,
                           start_method="spawn")
        per_rank = [torch.load(os.path.join(out_dir, f"{r}.pt")) for r in range(args.world)]
    from htmuon_dist import param_groups

    model = _model(args)
    groups = param_groups(model, "muon")
    matrix_bytes = sum(p.numel() for p in groups[0]["params"]) * 4
    total_bytes = sum(p.numel() for p in model.parameters()) * 4
    print(f"LLaMA hidden {args.hidden}, ffn {args.ffn}, layers {args.layers}, vocab {args.vocab}: "
          f"{total_bytes / 1e6:.2f} MB fp32 parameters, {matrix_bytes / 1e6:.2f} MB in Muon/HTMuon "
          f"matrices; W = {args.world} gloo ranks (CPU); bytes sent per rank in one step (mean over ranks)")
    print(f"{'stage':>5} {'optimizer':>10} {'step MB':>9} {'extra MB':>9} {'extra/matrices':>14} "
          f"{'HTMuon engine MB':>16}  note")
    base = {}
    breakdown = []
    for i, (stage, kind, *_rest) in enumerate(per_rank[0]):
        sent = [rows[i][2] for rows in per_rank]
        own = [rows[i][3] for rows in per_rank]
        note = per_rank[0][i][5]
        by_op = per_rank[0][i][4]
        if min(sent) < 0:
            print(f"{stage:>5} {kind:>10} {'failed':>9} {'':>9} {'':>14} {'':>16}  {note}")
            continue
        mean = sum(sent) / len(sent)
        if kind == "adamw":
            base[stage] = mean
        extra = mean - base.get(stage, mean)
        engine = f"{sum(own) / len(own) / 1e6:.3f}" if kind == "htmuon" else ""
        if stage == 3 and kind == "muon":
            note = note or "reduce_scatter off (required by DeepSpeed's Muon at ZeRO-3)"
        print(f"{stage:>5} {kind:>10} {mean / 1e6:>9.3f} {extra / 1e6:>9.3f} "
              f"{extra / matrix_bytes:>14.2f} {engine:>16}  {note}")
        breakdown.append(f"  zero{stage} {kind:>7} (rank 0, MB): {by_op}")
    print("per collective:")
    print("\n".join(breakdown))


if __name__ == "__main__":
    main()
