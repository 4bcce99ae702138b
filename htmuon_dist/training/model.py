"""LLaMA (and Mixtral-style MoE) configs from ``configs/model/*.json``, deterministic
initialisation, and export. ``"model_type": "mixtral"`` builds a ``MixtralForCausalLM``
(experts stored as (E, 2I, H) / (E, H, I) tensors, a top-k router per layer).

Initialisation is a function of (seed, parameter name) only: every parameter is drawn from its
own generator, so a model is the same whether it was built whole on one process, replicated
for DDP, or built on the meta device and sharded by FSDP2 (each rank then fills just its rows).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from .common import ConfigError, model_config_path

if TYPE_CHECKING:  # config.py is not imported at run time: the two modules do not depend on each other
    from .config import ModelArguments

# Keys a LlamaConfig JSON may carry besides LlamaConfig's own (comments, older spellings).
_EXTRA_KEYS = {"_comment", "rope_theta", "rope_scaling", "torch_dtype", "use_cache", "transformers_version"}


def load_llama_config(args: ModelArguments, tokenizer_size: Optional[int] = None):
    """A validated :class:`transformers.LlamaConfig`.

    Raises:
        ConfigError: unknown keys (with the closest valid ones), or a tokenizer larger than the
            vocabulary.
    """
    import difflib

    path = model_config_path(args.model)
    try:
        raw: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--model {path}: not valid JSON ({e}); fix the file or pass one of configs/model/*.json") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--model {path}: expected a JSON object of LlamaConfig fields, got {type(raw).__name__}")
    if args.model_overrides:
        try:
            overrides = json.loads(args.model_overrides)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--model_overrides is not valid JSON ({e}); example: '{{\"num_hidden_layers\": 2}}'") from None
        if not isinstance(overrides, dict):
            raise ConfigError(f"--model_overrides must be a JSON object, got {type(overrides).__name__}; example: '{{\"num_hidden_layers\": 2}}'")
        raw.update(overrides)
    model_type = raw.get("model_type", "llama")
    if model_type not in _CLASSES:
        raise ConfigError(f"{path}: model_type {model_type!r}; this trainer builds {sorted(_CLASSES)} models only")
    LlamaConfig = _config_class(model_type)  # noqa: N806 - the config class of model_type
    allowed = set(LlamaConfig().to_dict()) | _EXTRA_KEYS
    unknown = sorted(set(raw) - allowed)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"{path}: unknown LlamaConfig keys {', '.join(hints)}; fix or remove them")
    raw.pop("_comment", None)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings"):
        value = raw.get(key, 1)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{path}: {key} must be a positive integer, got {value!r}; fix the model JSON or --model_overrides")
    try:
        cfg = LlamaConfig(**raw)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path}: LlamaConfig rejects it ({e}); fix the model JSON or --model_overrides") from None
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ConfigError(f"{path}: hidden_size {cfg.hidden_size} is not divisible by num_attention_heads {cfg.num_attention_heads}")
    if tokenizer_size is not None and tokenizer_size > cfg.vocab_size:
        # Not fatal (t5-base has 100 sentinel ids above 32000 that text never produces); the data
        # stream checks every id and fails with the fix if one is out of range.
        import warnings

        warnings.warn(
            f"the tokenizer has {tokenizer_size} entries but vocab_size is {cfg.vocab_size}; ids >= "
            f"{cfg.vocab_size} will stop the run (the reference's t5-base never emits its sentinels)"
        )
    return cfg


_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mixtral": ("MixtralConfig", "MixtralForCausalLM")}


def _config_class(model_type: str):
    import transformers

    return getattr(transformers, _CLASSES[model_type][0])


def model_class(cfg):
    """The causal-LM class for ``cfg.model_type`` (LlamaForCausalLM or MixtralForCausalLM)."""
    import transformers

    return getattr(transformers, _CLASSES[getattr(cfg, "model_type", "llama")][1])


def describe(cfg) -> dict[str, Any]:
    """The shape-defining fields, for checkpoint compatibility checks and logs."""
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "tie_word_embeddings")
    out = {k: getattr(cfg, k) for k in keys}
    if getattr(cfg, "model_type", "llama") == "mixtral":
        out.update(num_local_experts=cfg.num_local_experts, num_experts_per_tok=cfg.num_experts_per_tok)
    return out


def count_parameters(cfg) -> int:
    """Parameters of a LlamaForCausalLM with this config, without building it."""
    h, f, v, layers = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    kv = h * cfg.num_key_value_heads // cfg.num_attention_heads
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h
    if getattr(cfg, "model_type", "llama") == "mixtral":  # E experts and an (E, h) router
        experts = cfg.num_local_experts
        per_layer = 2 * h * h + 2 * h * kv + experts * 3 * h * f + experts * h + 2 * h
    return v * h * (1 if cfg.tie_word_embeddings else 2) + layers * per_layer + h


def _generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return g


@torch.no_grad()
def init_weights_(model: nn.Module, seed: int, std: float) -> None:
    """LLaMA init: Linear/Embedding weights ~ N(0, std), biases 0, RMSNorm gains 1.

    Works on plain tensors, on DTensor shards (FSDP2) and on parameters that DeepSpeed ZeRO-3
    partitioned at construction (``zero.Init``; they carry ``ds_id``): the full tensor is drawn
    on the parameter's device from a per-name generator and each rank keeps its piece, so the
    result does not depend on the world size or the sharding backend. Peak extra memory is one
    module's parameters (ZeRO-3's are gathered one module at a time; every rank draws the same
    values and rank 0's are kept).
    """
    from contextlib import nullcontext

    for module_name, module in model.named_modules():
        params = list(module.named_parameters(recurse=False))
        partitioned = [p for _, p in params if hasattr(p, "ds_id")]
        gathered = nullcontext()
        if partitioned:
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0)
        with gathered:
            for pname, p in params:
                _init_parameter(module, module_name, pname, p, seed, std)


def _init_parameter(module: nn.Module, module_name: str, pname: str, p: nn.Parameter, seed: int, std: float) -> None:
    """One parameter of :func:`init_weights_`, in place (a DTensor: this rank's piece)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full_name = f"{module_name}.{pname}" if module_name else pname
    kind = type(module).__name__
    if kind.endswith("RMSNorm") and pname == "weight":
        fill = 1.0
    elif isinstance(module, (nn.Linear, nn.Embedding)) and pname == "weight":
        fill = None
    elif kind.endswith("Experts") or (kind.endswith("Router") and pname == "weight"):
        fill = None  # MoE expert stacks (E, ., .) and the router (E, h): N(0, std) like a Linear
    elif pname == "bias":
        fill = 0.0
    else:
        raise RuntimeError(f"init_weights_: do not know how to initialise {full_name} ({kind})")
    device = p.device
    if fill is not None:
        (p.to_local() if isinstance(p, DTensor) else p).fill_(fill)
        return
    value = torch.empty(p.shape, dtype=torch.float32, device=device)
    value.normal_(0.0, std, generator=_generator(seed, full_name, device))
    if isinstance(p, DTensor):
        # src_data_rank=None: each rank slices its own rows, no communication.
        piece = distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None).to_local()
        p.to_local().copy_(piece)
    else:
        p.copy_(value)


def build_model(cfg, on_meta: bool, activation_checkpointing: bool, zero3_aware: bool = False) -> nn.Module:
    """A LlamaForCausalLM (MixtralForCausalLM for a mixtral config), parameters on the meta device if ``on_meta`` (buffers stay real, so
    the rotary tables survive ``to_empty``; see :func:`materialize`). ``zero3_aware``: built
    with ``_from_config``, which partitions at construction under an active DeepSpeed ZeRO-3
    config (Accelerate's ``zero3_init_flag``)."""
    LlamaForCausalLM = model_class(cfg)  # noqa: N806

    if zero3_aware:
        model = LlamaForCausalLM._from_config(cfg)
    elif on_meta:
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            model = LlamaForCausalLM(cfg)
    else:
        model = LlamaForCausalLM(cfg)
    model.config.use_cache = False
    if activation_checkpointing:
        # Non-reentrant checkpointing composes with FSDP2/FSDP1 and DDP.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def materialize(model: nn.Module, device: torch.device, seed: int, std: float) -> None:
    """Allocates meta parameters (FSDP2: this rank's shards only) on ``device`` and initialises
    every parameter; buffers (rotary tables) are kept."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    if any(p.is_meta for p in model.parameters()):
        model.to_empty(device=device)
    else:
        model.to(device)
    for name, b in model.named_buffers():
        b.copy_(buffers[name].to(device))
    init_weights_(model, seed, std)


def export_pretrained(state_dict: dict[str, torch.Tensor], cfg, tokenizer, out_dir: Path) -> None:
    """Writes ``config.json``, ``model.safetensors`` and the tokenizer with ``save_pretrained``.

    Call on one process with the full state dict (on the CPU).
    """
    LlamaForCausalLM = model_class(cfg)  # noqa: N806

    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    missing = set(model.state_dict()) - set(state_dict)
    if missing:
        raise RuntimeError(f"export: state dict lacks {sorted(missing)[:5]}")
    model.load_state_dict(state_dict, assign=True, strict=False)
    # Non-persistent buffers (rotary tables) are not in the state dict: rebuild them.
    model.model.rotary_emb = type(model.model.rotary_emb)(cfg)
    model.config.use_cache = True
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
