"""Load an fp32 checkpoint as a bf16 (or fp16) model without holding the whole file beside the cast weights.

`from_pretrained(dtype=torch.bfloat16)` on an fp32 checkpoint reads every weight from the mapped file and casts it,
and each page it read stays resident until the whole mapping goes: the process holds the file and the bf16 copies
at once (2.4 GB at the peak for a 362M-parameter model whose bf16 weights take 0.72 GB). Loading it in fp32 instead
maps the file without reading it (each weight a view of the mapping); casting the weights one by one then gives
each weight's pages back as soon as its copy exists (file_pages.py), so the peak is the bf16 model plus one weight.

    model = load_half_from_fp32(AutoModelForCausalLM, source, {}, {}, torch.bfloat16)   # None: load as usual

It returns None, having loaded nothing, unless the dtype is bf16 or fp16 and every floating tensor of the
checkpoint's safetensors files is fp32; and it drops what it loaded and returns None unless the cast gives what
transformers' own half-precision load gives: every weight loaded from the checkpoint (none initialised), no
module kept in fp32 by the architecture (`_keep_in_fp32_modules`: T5's `wo`), and the architecture building the
same parameter and buffer dtypes in that dtype as this load has after the cast (checked on a skeleton on the meta
device: a buffer computed in the default dtype at initialisation would differ). tests/unit/test_half_from_fp32.py
compares both loads, tensor by tensor.
"""

from __future__ import annotations

import copy
import gc

import torch

from lorakit.file_pages import FileMappings, cast_in_place
from lorakit.models.stored_bf16 import checkpoint_dtypes

HALF_DTYPES = (torch.bfloat16, torch.float16)


def load_half_from_fp32(auto_class, source: str, source_kwargs: dict, head_kwargs: dict, dtype):
    """The model in `dtype` from an fp32 checkpoint, cast weight by weight with the file's pages given back, or
    None; see the module docstring."""
    if dtype not in HALF_DTYPES or checkpoint_dtypes(source, source_kwargs) != {"F32"}:
        return None
    model, info = auto_class.from_pretrained(source, dtype=torch.float32, output_loading_info=True,
                                             **source_kwargs, **head_kwargs)
    if not _castable(model, info, auto_class, dtype):
        del model
        gc.collect()
        return None
    mappings = FileMappings.read()
    for param in model.parameters():  # a tied weight is one parameter: cast once
        if param.is_floating_point():
            cast_in_place(param, dtype, mappings)
    model.config.dtype = dtype  # as the half-precision load records it (saved with the model)
    return model


def _castable(model: torch.nn.Module, info: dict, auto_class, dtype: torch.dtype) -> bool:
    if info.get("missing_keys") or info.get("mismatched_keys"):
        return False
    if getattr(model, "_keep_in_fp32_modules", None) or getattr(model, "_keep_in_fp32_modules_strict", None):
        return False
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters()):
        return False
    try:
        with torch.device("meta"):
            skeleton = auto_class.from_config(copy.deepcopy(model.config), dtype=dtype)  # the model's config untouched
    except Exception:  # noqa: BLE001 - an architecture its Auto class cannot build from the config: load as usual
        return False
    expected = {name: t.dtype for name, t in (*skeleton.named_parameters(), *skeleton.named_buffers())}
    after_cast = {name: dtype if p.is_floating_point() else p.dtype for name, p in model.named_parameters()}
    after_cast.update((name, b.dtype) for name, b in model.named_buffers())
    return expected == after_cast
