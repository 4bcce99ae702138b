"""Tiny transformers MoE / fused-projection models and their oracles for the equivalence tests.

The oracles hold the same weights as separate 2-D parameters (one per expert and per gate/up
block; q, k, v, gate and up apart) and compute the same forward, so the single-process
HTMuon on them, which treats every 2-D parameter as one matrix, is the reference that the
stacked / split parameters must equal. Importable by spawned ranks.
"""

from __future__ import annotations

import torch
import transformers as T
from torch import nn

EXPERTS, HIDDEN, INTER, VOCAB, SEQ = 4, 16, 12, 64, 8


def tiny_mixtral(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = T.MixtralConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             num_local_experts=EXPERTS, num_experts_per_tok=2, max_position_embeddings=64,
                             pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = T.MixtralForCausalLM(config)
    model.config.use_cache = False
    return model


def tiny_phi3(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = T.Phi3Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = T.Phi3ForCausalLM(config)
    model.config.use_cache = False
    return model


class PerExpertExperts(nn.Module):
    """A MixtralExperts with per-expert 2-D gate, up and down parameters; the original class's
    forward runs on the stacks rebuilt from them."""

    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        self._forward = type(experts).forward
        self._apply_gate = type(experts)._apply_gate.__get__(self)
        for key, value in vars(experts).items():  # config, layout flags, num_experts, ...
            if key not in vars(nn.Module()) and not isinstance(value, (nn.Module, torch.Tensor)):
                setattr(self, key, value)
        self.act_fn = experts.act_fn
        inter = experts.gate_up_proj.shape[1] // 2
        gu, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
        self.gate = nn.ParameterList([nn.Parameter(gu[e, :inter].clone()) for e in range(self.num_experts)])
        self.up = nn.ParameterList([nn.Parameter(gu[e, inter:].clone()) for e in range(self.num_experts)])
        self.down = nn.ParameterList([nn.Parameter(down[e].clone()) for e in range(self.num_experts)])

    @property
    def gate_up_proj(self) -> torch.Tensor:
        return torch.stack([torch.cat([g, u]) for g, u in zip(self.gate, self.up)])

    @property
    def down_proj(self) -> torch.Tensor:
        return torch.stack(list(self.down))

    def forward(self, *args, **kwargs):
        return self._forward(self, *args, **kwargs)


class FusedFromParts(nn.Module):
    """A bias-free fused linear whose weight is the row concatenation of separate parameters."""

    def __init__(self, linear: nn.Linear, rows: list[int]) -> None:
        super().__init__()
        self.parts = nn.ParameterList([nn.Parameter(w.clone()) for w in linear.weight.detach().split(rows)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, torch.cat(list(self.parts)))


def per_expert_oracle(model: nn.Module) -> nn.Module:
    for layer in model.model.layers:
        layer.mlp.experts = PerExpertExperts(layer.mlp.experts)
    return model


def separate_oracle(model: nn.Module) -> nn.Module:
    """Phi-3 with q, k, v and gate, up as separate parameters."""
    c = model.config
    hd = c.hidden_size // c.num_attention_heads
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_proj = FusedFromParts(attn.qkv_proj, [c.num_attention_heads * hd, c.num_key_value_heads * hd,
                                                       c.num_key_value_heads * hd])
        mlp.gate_up_proj = FusedFromParts(mlp.gate_up_proj, [c.intermediate_size] * 2)
    return model


def stacked_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters under the original (stacked / fused) names, whichever form ``model`` has."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, PerExpertExperts):
            out[name + ".gate_up_proj"] = module.gate_up_proj.detach().clone()
            out[name + ".down_proj"] = module.down_proj.detach().clone()
        elif isinstance(module, FusedFromParts):
            out[name + ".weight"] = torch.cat([p.detach() for p in module.parts])
    for name, p in model.named_parameters():
        if ".gate." in name + "." and "experts" in name or ".parts." in name or ".experts.up." in name \
                or ".experts.down." in name:
            continue
        value = p.full_tensor() if hasattr(p, "full_tensor") else p
        out.setdefault(name, value.detach().clone())
    return out


def batches(steps: int, global_batch: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    return [torch.randint(3, VOCAB, (global_batch, SEQ), generator=g) for _ in range(steps)]


OPT = dict(lr=0.02, power=0.125, weight_decay=0.1, adamw_lr=3e-3, adamw_weight_decay=0.01)


def train(model: nn.Module, data, rank: int = 0, world: int = 1, process_group="auto", **opt_extra):
    from htmuon_dist import HTMuon, param_groups

    opt = HTMuon(param_groups(model), **OPT, process_group=process_group, **opt_extra)
    per = data[0].shape[0] // world
    for x in data:
        x = x[rank * per:(rank + 1) * per]
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


def reference(kind: str, steps: int, global_batch: int) -> dict[str, torch.Tensor]:
    model = per_expert_oracle(tiny_mixtral()) if kind == "mixtral" else separate_oracle(tiny_phi3())
    train(model, batches(steps, global_batch), process_group=None)
    return stacked_state(model)


def sharded(rank: int, world: int, kind: str, steps: int, global_batch: int) -> dict:
    """``kind`` with stacked experts / fused projections under FSDP2 on ``world`` ranks."""
    from torch.distributed.fsdp import fully_shard

    model = tiny_mixtral() if kind == "mixtral" else tiny_phi3()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = train(model, batches(steps, global_batch), rank, world)
    names = [n for n in opt.engine.names]
    return {"params": stacked_state(model), "names": names, "owners": list(opt.engine.plan.owners),
            "sent": opt.comm_bytes_last_step}
