"""Tiny models and a tiny tokenizer for fast tests (no downloads, built from configs).

Every builder seeds torch so that two calls give the same weights.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
# A ChatML template like SmolLM2's, without the default system prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_VOCAB = 272  # 5 special tokens + 256 bytes, rounded up to a multiple of 8


def tiny_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (one token per byte, no merges): any text round-trips."""
    byte_symbols = list(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for sym in sorted(byte_symbols):
        vocab[sym] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>", "</s>"],
    )
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=TINY_VOCAB, max_position_embeddings=256,
               pad_token_id=0, bos_token_id=1, eos_token_id=4)
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def tiny_gpt2(seed: int = 0, **overrides) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=TINY_VOCAB, n_positions=128,
               bos_token_id=1, eos_token_id=4, pad_token_id=0)
    cfg.update(overrides)
    return GPT2LMHeadModel(GPT2Config(**cfg)).eval()


def tiny_bert_classifier(seed: int = 0, num_labels: int = 3, **overrides) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               vocab_size=TINY_VOCAB, max_position_embeddings=128, num_labels=num_labels, pad_token_id=0)
    cfg.update(overrides)
    return BertForSequenceClassification(BertConfig(**cfg)).eval()


def tiny_t5(seed: int = 0, **overrides) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = dict(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, vocab_size=TINY_VOCAB,
               decoder_start_token_id=0, pad_token_id=0, eos_token_id=4)
    cfg.update(overrides)
    return T5ForConditionalGeneration(T5Config(**cfg)).eval()


def randomize_trainable(model, seed: int = 0, std: float = 0.3) -> None:
    """Add seeded noise to every trainable parameter, so that adapters initialised to the identity act."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * std)
