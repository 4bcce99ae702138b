"""Models, data and sharding wrappers shared by the multi-rank tests (importable by spawned ranks)."""

from __future__ import annotations

import torch
from torch import nn

from tiny_llama import tiny_llama


class Block(nn.Linear):
    """The unit FSDP wraps on its own in OddShapes."""


class OddShapes(nn.Module):
    """Matrices that shard badly: 3 rows (empty FSDP2 shard at W=4), 1 row (one rank holds it
    all), a conv weight, a square one and, unless ``with_empty`` is False, a (0, 16) matrix that
    no rank holds any of (FSDP2's reduce-scatter itself cannot handle that one)."""

    def __init__(self, with_empty: bool = True) -> None:
        super().__init__()
        self.a = nn.Linear(16, 3, bias=False)
        self.one_row = nn.Linear(3, 1)
        self.empty = nn.Linear(16, 0, bias=False) if with_empty else None
        self.conv = nn.Conv1d(1, 5, kernel_size=3, padding=1)
        self.square = nn.Linear(16, 16, bias=False)
        self.inner = nn.ModuleList([Block(16, 16, bias=False) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.square(x))
        for layer in self.inner:
            h = torch.tanh(layer(h))
        c = self.conv(h.unsqueeze(1)).mean(dim=1)  # (b, 16)
        z = torch.tanh(self.a(c))
        if self.empty is not None:
            z = torch.cat([z, self.empty(h)], dim=-1)
        return self.one_row(z).squeeze(-1)


class SingleMatrix(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Linear(7, 5, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w(x).pow(2).sum(-1)


def build(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "llama":
        return tiny_llama(seed=seed)
    if kind in ("odd", "odd_no_empty"):
        return OddShapes(with_empty=kind == "odd")
    if kind == "single":
        return SingleMatrix()
    raise ValueError(kind)


def make_batches(kind: str, steps: int, accum: int, global_batch: int, seed: int = 0) -> list:
    """[step][micro] -> a global batch; rank r of W takes rows r*B/W : (r+1)*B/W."""
    g = torch.Generator().manual_seed(seed + 1000)
    out = []
    for _ in range(steps):
        micro = []
        for _ in range(accum):
            if kind == "llama":
                micro.append(torch.randint(0, 128, (global_batch, 12), generator=g))
            elif kind.startswith("odd"):
                micro.append(torch.randn(global_batch, 16, generator=g))
            else:
                micro.append(torch.randn(global_batch, 7, generator=g))
        out.append(micro)
    return out


def loss_fn(kind: str, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if kind == "llama":
        return model(input_ids=x, labels=x).loss
    return model(x).pow(2).mean()


def wrap(model: nn.Module, kind: str, backend: str) -> nn.Module:
    """Shards ``model`` in place (fsdp2) or wraps it (fsdp1, ddp); 'none' leaves it alone."""
    if backend == "none":
        return model
    if backend == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        blocks = model.model.layers if kind == "llama" else getattr(model, "inner", [])
        for block in blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    if backend == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        if kind == "llama":
            from transformers.models.llama.modeling_llama import LlamaDecoderLayer

            policy = ModuleWrapPolicy({LlamaDecoderLayer})
        else:
            policy = ModuleWrapPolicy({Block}) if kind.startswith("odd") else None
        return FSDP(model, use_orig_params=True, auto_wrap_policy=policy, device_id=torch.device("cpu"))
    if backend == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model)
    raise ValueError(backend)


def full_state(model: nn.Module, backend: str) -> dict[str, torch.Tensor]:
    """Every parameter whole, by name (collective for the sharded backends)."""
    if backend == "fsdp2":
        return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    if backend == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model, writeback=False):
            return {n.replace("_fsdp_wrapped_module.", ""): p.detach().clone()
                    for n, p in model.named_parameters()}
    inner = model.module if backend == "ddp" else model
    return {n: p.detach().clone() for n, p in inner.named_parameters()}
