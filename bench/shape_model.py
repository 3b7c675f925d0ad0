"""Write a randomly initialised model with the shape of a model users fine-tune, to benchmark at that size offline.

    PYTHONPATH=src python bench/shape_model.py --shape qwen2.5-0.5b --out /tmp/qwen-shape
    lorakit bench train --model /tmp/qwen-shape --settings bf16,autocast,default

A training step's speed and memory depend on the model's shapes (widths, layers, heads, vocabulary, biases), not
on its weights' values, so a random model of the right configuration measures what the real one would, without
the Hub. The tokenizer is the embedded SmolLM2's (the benchmarks draw random token ids below the model's own
vocabulary size). The architectures' configurations are those their model cards publish. `--dtype bfloat16`
writes the checkpoint in bf16, as those models are published (a run's loading differs: models/stored_bf16.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

SHAPES = {
    # Llama architecture, as the embedded model, 2.7x its size
    "smollm2-360m": dict(model_type="llama", hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                         num_attention_heads=15, num_key_value_heads=5, head_dim=64, vocab_size=49152,
                         tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0),
    # Qwen2: biases on q / k / v, 7 query heads per key-value head, a 151,936-entry vocabulary
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                         rms_norm_eps=1e-6, rope_theta=1000000.0, max_window_layers=21, use_sliding_window=False),
    # Llama 3.2: 2,048 wide, 4 query heads per key-value head, a 128,256-entry vocabulary
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                         tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=500000.0),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def write_shape_model(shape: str, out: Path, seed: int = 0, dtype: str = "float32") -> int:
    """Writes the model (safetensors in `dtype`, config) and the embedded tokenizer to `out`; returns the parameter
    count. "bfloat16" writes the checkpoint as the published ones are (fp32 draws, rounded). Refuses an `out`
    that exists, so nothing is overwritten; the directory appears whole or not at all."""
    from lorakit.atomic import disk_full_says, remove_path, replace_directory
    from lorakit.models.embedded import resolve_model_path

    if out.exists():
        raise FileExistsError(f"{out} exists; give --out a new directory")
    options = dict(SHAPES[shape])
    config = AutoConfig.for_model(options.pop("model_type"), **options)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(getattr(torch, dtype))
    count = sum(p.numel() for p in model.parameters())
    temp = f"{out}.tmp-{os.getpid()}"
    needed = torch.finfo(getattr(torch, dtype)).bits // 8 * count
    with disk_full_says(f"the {shape} model", str(out.parent), needed_bytes=needed, cleanup=[temp]):
        try:
            model.save_pretrained(temp)
            source = Path(resolve_model_path("smollm2"))
            for name in TOKENIZER_FILES:
                if (source / name).exists():
                    shutil.copy(source / name, Path(temp) / name)
            replace_directory(temp, str(out))
        except BaseException:
            remove_path(temp)
            raise
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", required=True, choices=sorted(SHAPES))
    parser.add_argument("--out", required=True, type=Path, help="a new directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the checkpoint's dtype (the published checkpoints of these models are bfloat16)")
    args = parser.parse_args()
    try:
        count = write_shape_model(args.shape, args.out, args.seed, args.dtype)
    except FileExistsError as err:
        sys.exit(f"error: {err}")
    print(f"{args.shape}: {count / 1e6:.1f}M parameters written to {args.out}")


if __name__ == "__main__":
    main()
