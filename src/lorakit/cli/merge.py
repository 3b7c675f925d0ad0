"""Merge an adapter into its base model (W = W0 + s B A) and save a plain transformers model.

    lorakit merge --adapter runs/my-run/adapter --output merged/
    lorakit merge --model smollm2 --adapter runs/my-run/adapter --output merged/ --overwrite

The result loads with AutoModelForCausalLM.from_pretrained(OUT) (AutoModelForSequenceClassification for
a SEQ_CLS adapter), without lorakit, and gives the same outputs as base + adapter; the tokenizer is saved
with it. The merge is done in the dtype the model is loaded in: float32 by default. With --dtype bfloat16
or float16 the merged weights are rounded to that dtype: half the size on disk, but no longer exactly
base + adapter.
An adapter trained on an NF4-quantized base (QLoRA) is merged into the unquantized base weights by default:
the full-precision model the adapter's base was quantized from. With --quantization nf4 it is merged into the
dequantized NF4 weights instead (exactly the weights it was trained against); either way the result is a
dense model (docs/qlora.md).
OUT is written to a temporary directory and renamed into place when complete, so an interrupted merge
leaves no half-written model. An existing non-empty OUT is replaced only with --overwrite.
"""

from __future__ import annotations

import argparse
import os
import shutil
import warnings

from lorakit.cli.common import add_model_arguments, load_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, adapter_required=True)
    parser.add_argument("--output", required=True, metavar="OUT", help="directory to write the merged model to")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it already holds files")


def run(args: argparse.Namespace) -> int:
    out = os.path.normpath(args.output)
    check_output_dir(out, args.overwrite)  # before the (slow) loading
    loaded = load_model(args)
    with warnings.catch_warnings():  # --quantization nf4: the dense result is the point, not a surprise
        warnings.filterwarnings("ignore", message="merging into an NF4 layer")
        merged = loaded.model.merge_and_unload(safe_merge=True)
    temp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)
    try:
        merged.save_pretrained(temp)
        loaded.tokenizer.save_pretrained(temp)
        publish(temp, out)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    dtype = str(next(merged.parameters()).dtype).removeprefix("torch.")
    print(f"merged {loaded.adapter_dir} into {loaded.model_name} ({dtype}) -> {out}")
    return 0


def check_output_dir(out: str, overwrite: bool) -> None:
    if os.path.isfile(out):
        raise FileExistsError(f"--output {out!r} is a file; give a directory")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise FileExistsError(f"--output {out!r} already exists and is not empty; pass --overwrite to replace it, "
                              "or choose another directory")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"the parent directory of --output {out!r} does not exist")


def publish(temp: str, out: str) -> None:
    """Put the finished directory in place; an earlier OUT is removed only once the new one is there."""
    if not os.path.isdir(out):
        os.replace(temp, out)
        return
    old = f"{out}.old-{os.getpid()}"
    os.replace(out, old)
    try:
        os.replace(temp, out)
    except OSError:
        os.replace(old, out)  # put the earlier model back
        raise
    shutil.rmtree(old, ignore_errors=True)
