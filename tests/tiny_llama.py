"""A tiny LLaMA (transformers) whose shapes shard unevenly over 2, 3 and 4 ranks."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(seed: int = 0, vocab: int = 128, hidden: int = 40, ffn: int = 70, layers: int = 2) -> LlamaForCausalLM:
    """hidden 40 / 5 heads, ffn 70, vocab 128: row counts 40, 70, 128 split unevenly."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=5, num_key_value_heads=5, max_position_embeddings=64,
        rms_norm_eps=1e-6, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).float()
