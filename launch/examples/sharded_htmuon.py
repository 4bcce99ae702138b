"""HTMuon under FSDP2, FSDP1 or DDP in a plain PyTorch loop (CPU/gloo or GPU/NCCL).

    torchrun --nproc_per_node 2 launch/examples/sharded_htmuon.py --backend fsdp2
    torchrun --nproc_per_node 2 launch/examples/sharded_htmuon.py --backend fsdp1
    torchrun --nproc_per_node 2 launch/examples/sharded_htmuon.py --backend ddp

Each rank trains a small LLaMA on random tokens; rank 0 prints the loss, which backend HTMuon
detected, the plan's balance and the bytes this rank sent for the spectral exchange per step.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from htmuon_dist import HTMuon, attach_fsdp1, param_groups


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=["fsdp2", "fsdp1", "ddp"], default="fsdp2")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)  # the same initial weights on every rank
    config = LlamaConfig(vocab_size=512, hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(device)
    groups = param_groups(model, convention="muon")  # before wrapping: FSDP1 flattens shapes away

    if args.backend == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        groups = param_groups(model, convention="muon")  # fully_shard swapped in DTensors
        wrapped = model
    elif args.backend == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        wrapped = FSDP(model, use_orig_params=True, device_id=device,
                       auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}))
    else:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(model)

    opt = HTMuon(groups, lr=0.02, power=0.125, weight_decay=0.1, adamw_lr=3e-3)
    if args.backend == "fsdp1":
        attach_fsdp1(opt, wrapped)  # the one extra line FSDP1 needs

    g = torch.Generator().manual_seed(rank)
    for step in range(1, args.steps + 1):
        x = torch.randint(0, 64, (4, 32), generator=g).to(device)  # a small vocabulary to learn
        loss = wrapped(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if rank == 0 and (step == 1 or step % 5 == 0):
            print(f"step {step:3d} loss {loss.item():.3f} backend {opt.backend} "
                  f"balance {opt.engine.plan.balance:.2f} sent {opt.comm_bytes_last_step / 1e3:.1f} kB")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
