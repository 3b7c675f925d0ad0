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
OUT is written to a temporary sibling (OUT.tmp-<pid>) and renamed into place when complete, so an
interrupted merge leaves no half-written model; the temporary directory of a merge that was killed is removed
by the next merge into the same OUT. An existing non-empty OUT is replaced only with --overwrite, and only once
the new model is complete. OUT may not be (or contain, or lie inside) the adapter or the base model it merges.
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
    from lorakit.atomic import clean_interrupted_writes, disk_full_says, replace_directory, tensor_bytes

    out = os.path.normpath(args.output)
    parent, name = os.path.split(os.path.abspath(out))
    clean_interrupted_writes(parent, only=name)  # what a killed merge into OUT left (first: it may put OUT back)
    check_output_dir(out, args.overwrite)  # before the (slow) loading
    check_not_a_source(out, args)
    loaded = load_model(args)
    with warnings.catch_warnings():  # --quantization nf4: the dense result is the point, not a surprise
        warnings.filterwarnings("ignore", message="merging into an NF4 layer")
        merged = loaded.model.merge_and_unload(safe_merge=True)
    temp = f"{out}.tmp-{os.getpid()}"
    with disk_full_says(f"the merged model {out!r}", parent, tensor_bytes(merged.state_dict()), cleanup=[temp],
                        advice="The adapter and any earlier OUT are untouched."):
        try:
            merged.save_pretrained(temp)
            loaded.tokenizer.save_pretrained(temp)
            replace_directory(temp, out)
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


def check_not_a_source(out: str, args: argparse.Namespace) -> None:
    """Replacing OUT must never delete what the merge reads: the adapter (or the run holding it) and a local
    base model. Refused before anything is loaded, with or without --overwrite."""
    from lorakit.cli.common import read_adapter

    adapter_dir, adapter_config = read_adapter(args)
    base = args.model or getattr(adapter_config, "base_model_name_or_path", None)
    sources = [("the adapter", args.adapter), ("the adapter", adapter_dir)]
    if base and os.path.isdir(base):
        sources.append(("the base model", base))
    target = os.path.realpath(out)
    for what, source in sources:
        if not source or not os.path.exists(source):
            continue
        source = os.path.realpath(source)
        if target == source or _inside(source, target) or _inside(target, source):
            raise ValueError(f"--output {out!r} would replace {what} it merges ({source}); choose an --output "
                             "outside it, e.g. a new directory next to it")


def _inside(path: str, directory: str) -> bool:
    return os.path.commonpath([path, directory]) == directory
