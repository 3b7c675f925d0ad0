"""Shared pieces of the CLI tests: a tiny model directory, tiny data files, adapters, and running commands.

Commands run in-process through `lorakit.cli.main.main([...])` (fast), with stdout / stderr captured.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from lorakit import LoraConfig, get_peft_model
from lorakit.cli.main import main
from tests.tiny import tiny_llama, tiny_tokenizer

ALPACA_ROWS = [{"instruction": f"add {i} and 1", "output": str(i + 1)} for i in range(12)]


def make_model_dir(path: Path) -> Path:
    """A tiny Llama (hidden size 32, 2 layers) with a ChatML byte-level tokenizer, saved like a real model."""
    tiny_llama().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def make_adapter(model_dir: Path, out: Path, seed: int = 0) -> Path:
    """A non-trivial LoRA adapter (random B, so it changes the outputs) on the model in model_dir.

    The base is loaded from model_dir, so adapter_config.json names it as base_model_name_or_path."""
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                        task_type="CAUSAL_LM")
    get_peft_model(base, config).save_pretrained(str(out))
    return out


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `lorakit *args`, run in this process."""
    capsys.readouterr()  # drop anything printed before
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def preferred_malloc() -> tuple[dict, str]:
    """The environment without a malloc choice (no LD_PRELOAD, no LORAKIT_ALLOCATOR), and the malloc a `lorakit`
    command that runs a model re-executes itself on in it (cli/startup.py): tcmalloc when installed, else glibc."""
    from lorakit.train.runtime import find_allocator, library_label

    clean = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "LORAKIT_ALLOCATOR")}
    installed = find_allocator(clean)
    return clean, library_label(installed) if installed else "glibc"
