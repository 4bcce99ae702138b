"""Minimal reproduction: FSDP2 (fully_shard) over gloo aborts at interpreter exit.

    torchrun --nproc_per_node 4 docs/upstream/fsdp2_gloo_exit_abort.py            # one run
    python docs/upstream/fsdp2_gloo_exit_abort.py --runs 20                      # abort rate
    python docs/upstream/fsdp2_gloo_exit_abort.py --runs 20 --os-exit            # the workaround

Each rank: a 2-layer MLP under fully_shard on a CPU gloo group, 4 steps of forward, backward
and torch.optim.AdamW, destroy_process_group(), print "done", and exit normally with the model
and optimizer still referenced from module globals (as in a plain training script), so that
FSDP2's objects are destroyed during interpreter shutdown. Only torch.
Sometimes a rank then dies with "terminate called without an active exception" (SIGABRT,
exit -6) during interpreter shutdown, after "done". With --os-exit each rank calls
os._exit(0) right after destroy_process_group (what htmuon-train does).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


KEEP: dict = {}  # what a script's module-level variables would hold at exit


def rank_main(os_exit: bool) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64))
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(4):
        model(torch.randn(8, 64)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    KEEP.update(model=model, opt=opt)
    dist.destroy_process_group()
    print(f"rank {os.environ['RANK']} done", flush=True)
    if os_exit:
        os._exit(0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=0, help="launch this many 4-rank runs and count the aborts")
    ap.add_argument("--os-exit", action="store_true", help="os._exit(0) after destroy_process_group")
    ap.add_argument("--nproc", type=int, default=4)
    args = ap.parse_args()
    if "RANK" in os.environ:
        rank_main(args.os_exit)
        return 0
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    aborted = 0
    for i in range(args.runs):
        cmd = [torchrun, "--nproc_per_node", str(args.nproc), "--master_port", str(29400 + i % 50), __file__]
        if args.os_exit:
            cmd.append("--os-exit")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        out = proc.stdout + proc.stderr
        done = out.count(" done")
        abort = "terminate called without an active exception" in out or proc.returncode != 0
        aborted += abort
        print(f"run {i + 1}: exit {proc.returncode}, {done}/{args.nproc} ranks printed done"
              + (", ABORT at exit" if abort else ""), flush=True)
    if args.runs:
        print(f"{aborted} of {args.runs} runs aborted at exit (torch {__import__('torch').__version__}, "
              f"{'with' if args.os_exit else 'without'} os._exit)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
