"""Shared pieces of the benchmarks: a randomly initialised model of SmolLM2-135M's shape (no weights needed)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

# SmolLM2-135M's dimensions (its config.json): 30 blocks of 576 wide, MLP 1536, 9 query and 3 key/value heads.
SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                     num_hidden_layers=30, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True)


def smollm2_shaped(num_layers: int | None = None, vocab_size: int | None = None, seed: int = 0) -> LlamaForCausalLM:
    """A random model with SmolLM2-135M's layer sizes (optionally fewer blocks or a smaller vocabulary)."""
    torch.manual_seed(seed)
    shape = dict(SMOLLM2_SHAPE)
    if num_layers is not None:
        shape["num_hidden_layers"] = num_layers
    if vocab_size is not None:
        shape["vocab_size"] = vocab_size
    return LlamaForCausalLM(LlamaConfig(**shape)).train()
