"""Shared pieces of the transformers Trainer / TRL tests: tiny datasets, arguments, and checkpoint checks.

Runs are a few optimizer steps of the 2-layer tiny Llama on CPU with one torch thread (a fraction of a second each);
what costs is building the trainers, so each test builds as few as it can.
"""

from __future__ import annotations

import os

import peft
import torch
from datasets import Dataset
from safetensors.torch import load_file

import lorakit
from tests.tiny import tiny_llama, tiny_tokenizer

IDS = torch.tensor([[5, 9, 30, 31, 40, 7, 12]])
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md"}


def lora_model(seed: int = 0, **config) -> lorakit.PeftModel:
    torch.manual_seed(seed)
    settings = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(**{**settings, **config}))


def text_dataset(tokenizer=None, n: int = 32) -> Dataset:
    """Tokenized sentences (input_ids, attention_mask), as a user prepares them for transformers' Trainer."""
    tokenizer = tokenizer or tiny_tokenizer()
    texts = [f"{i % 7} plus {i % 5} makes {i % 7 + i % 5}." for i in range(n)]
    return Dataset.from_dict({"text": texts}).map(lambda b: tokenizer(b["text"]), batched=True,
                                                   remove_columns=["text"])


def chat_dataset(n: int = 32) -> Dataset:
    """Conversations in TRL's "messages" format."""
    return Dataset.from_list([{"messages": [{"role": "user", "content": f"add {i % 7} and {i % 5}"},
                                            {"role": "assistant", "content": str(i % 7 + i % 5)}]}
                              for i in range(n)])


def quick_args(output_dir, **overrides) -> dict:
    """TrainingArguments / SFTConfig keywords: 6 steps, evaluated and saved every 3, quiet, on CPU."""
    args = dict(output_dir=str(output_dir), per_device_train_batch_size=4, max_steps=6, eval_strategy="steps",
                eval_steps=3, save_steps=3, logging_steps=1, learning_rate=1e-2, report_to=[], use_cpu=True,
                disable_tqdm=True, seed=0)
    args.update(overrides)
    return args


def eval_losses(trainer) -> dict[int, float]:
    return {h["step"]: h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h}


def adapter_weights(directory) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(directory, "adapter_model.safetensors"))


def assert_same_weights(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=1e-6, msg=key)


def assert_loads_in_peft(directory, build=tiny_llama) -> torch.Tensor:
    """The directory holds PEFT-format adapter files (and no model weights); PEFT and lorakit load them to the same
    logits. Returns those logits."""
    files = set(os.listdir(directory))
    assert ADAPTER_FILES <= files, files
    assert not files & {"model.safetensors", "pytorch_model.bin"}, files
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(build(), str(directory)).eval()(input_ids=IDS).logits
        ours = lorakit.PeftModel.from_pretrained(build(), str(directory)).eval()(input_ids=IDS).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    return ours
