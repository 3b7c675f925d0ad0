"""Load a bf16 checkpoint's weights as stored (views of the mapped file), not as fp32 copies beside the file.

The published checkpoints of most models users fine-tune (Qwen2.5, Llama 3.2, ...) are bf16. A training run
loads its model in fp32 (the default), then stores the frozen weights in bf16 (train/precision.py). On a bf16
checkpoint that first builds an fp32 copy of every weight beside the mapped file, then casts it back to the
bf16 values the file held: 3x the file's size at the peak (7.4 GB for a 1.2B model, whose training step needs
3.9 GB), for weights that end up what they were.

    model = load_stored_bf16(AutoModelForCausalLM, source, {})   # None: load as usual

loads such a checkpoint with dtype=bfloat16 instead: transformers then makes each weight a view of the mapped
file (no copy, no page read until used). It returns None, having loaded nothing, unless every floating tensor
of the checkpoint's safetensors files is bf16; and it drops what it loaded and returns None unless the result
is what the fp32 load would give, in bf16: no weight missing from the checkpoint (initialised, not loaded), no
bf16 parameter that is not a view of the file (a cast), no buffer below fp32 (computed in bf16 at
initialisation). The caller then gives fp32 back to every parameter that is not stored in bf16 for training
(precision.store_frozen_weights_in_bf16 with loaded_dtype=float32): every bf16 value is exact in fp32, so the run
is the fp32-loaded run, bit for bit (tests/unit/test_stored_bf16.py).

Every other fp32 load of such a checkpoint goes the same way (models/loading.py): a QLoRA load quantizes the
weights as stored (quantization reads each weight in fp32: the same NF4 codes; the 1.2B model's load peaked at
7.4 GB for a 1.9 GB result), and then to_fp32 gives each remaining bf16 weight its fp32 copy and the file its
pages back, one weight at a time: the fp32 model without the file beside it (4.9 instead of 7.4 GB at 1.2B).
"""

from __future__ import annotations

import gc
import glob
import os

import torch
from safetensors import safe_open

from lorakit.file_pages import FileMappings, cast_in_place


def checkpoint_dtypes(source: str, source_kwargs: dict) -> set[str]:
    """The dtypes ("BF16", "F32", ...) of the floating tensors in the checkpoint's safetensors files; empty when
    there are none to read (a GGUF file, .bin weights, a Hub id that is not in the local cache)."""
    if source_kwargs.get("gguf_file"):
        return set()
    directory = source if os.path.isdir(source) else _cached_hub_snapshot(source)
    dtypes = set()
    if directory is None:
        return dtypes
    for path in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
        try:
            with safe_open(path, framework="pt") as tensors:
                for name in tensors.keys():
                    dtype = tensors.get_slice(name).get_dtype()
                    if dtype.startswith(("F", "BF")):
                        dtypes.add(dtype)
        except Exception:  # a file safetensors cannot read: the usual load reports it, as it always did
            return set()
    return dtypes


def _cached_hub_snapshot(repo_id: str) -> str | None:
    """The local snapshot directory of a Hub model whose safetensors files are already downloaded."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, allow_patterns=["*.safetensors"], local_files_only=True)
    except Exception:  # not cached, no such repository, an offline machine: load as usual
        return None


def load_stored_bf16(auto_class, source: str, source_kwargs: dict, head_kwargs: dict | None = None):
    """The model with its weights as stored in a bf16 checkpoint (views of the mapped file), or None; see the
    module docstring."""
    if checkpoint_dtypes(source, source_kwargs) != {"BF16"}:
        return None
    model, info = auto_class.from_pretrained(source, dtype=torch.bfloat16, output_loading_info=True,
                                             **source_kwargs, **(head_kwargs or {}))
    if _as_stored(model, info):
        return model
    del model
    gc.collect()
    return None


def _as_stored(model: torch.nn.Module, info: dict) -> bool:
    if info.get("missing_keys") or info.get("mismatched_keys"):
        return False
    mappings = FileMappings.read()
    for param in model.parameters():
        if param.dtype == torch.bfloat16 and not mappings.holds(param):
            return False
        if param.is_floating_point() and param.dtype not in (torch.bfloat16, torch.float32):
            return False
    return all(b.dtype == torch.float32 for b in model.buffers() if b.is_floating_point())


@torch.no_grad()
def to_fp32(model: torch.nn.Module) -> None:
    """Every bf16 parameter to fp32 in place, as the fp32 load would have given it (bf16 values are exact in fp32),
    each weight's pages of the mapped file given back as it goes (file_pages.py)."""
    mappings = FileMappings.read()
    for param in model.parameters():
        if param.dtype == torch.bfloat16:
            cast_in_place(param, torch.float32, mappings)
