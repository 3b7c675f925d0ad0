"""Quantizing a model's linear layers in place, and the options that choose how.

    model = quantize_model(model)                                  # NF4, double quantization, bf16 compute
    model = quantize_model(model, compute_dtype="float32", double_quant=False)

Every nn.Linear becomes an NF4Linear except the output head (lm_head, or the classification head, which a
classifier trains in full), the modules the model keeps in fp32 (transformers' `_keep_in_fp32_modules`,
e.g. T5's `wo`) and `skip_modules`. The dense weight of each layer is dropped as soon as it is quantized,
so the peak memory is the loaded model plus one layer.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.adapter_layer import AdapterHolder
from lorakit.config import suggest
from lorakit.file_pages import FileMappings, release_file_pages
from lorakit.inject import name_matches, output_head_names
from lorakit.methods.quant.foreign import foreign_layer_problem
from lorakit.methods.quant.linear import NF4Linear
from lorakit.methods.quant.nf4 import DEFAULT_BLOCKSIZE, check_blocksize

# quantization name -> builder(linear, blocksize, double_quant, compute_dtype) of the quantized layer
QUANTIZERS = {"nf4": NF4Linear.from_linear}
QUANTIZED_LAYER_TYPES = (NF4Linear,)
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# bf16 is QLoRA's compute dtype and, on CPUs with AVX512-BF16/AMX and on recent GPUs, ~4x faster than fp32
# matmuls; choose float32 on hardware without bf16 units, or for exact comparisons.
DEFAULT_COMPUTE_DTYPE = "bfloat16"


def check_quantization(name, owner: str = "quantization") -> str:
    """The quantization name, lower-cased; a ValueError naming the allowed ones otherwise."""
    key = str(name).lower() if isinstance(name, str) else name
    if key not in QUANTIZERS:
        raise ValueError(f"{owner}={name!r} is not a quantization lorakit knows{suggest(str(key), QUANTIZERS)}; "
                         f"use one of: {', '.join(QUANTIZERS)} (or leave it unset for a dense model)")
    return key


def resolve_compute_dtype(value, owner: str = "compute_dtype") -> torch.dtype:
    """None (the default, bfloat16), a name in COMPUTE_DTYPES, or a floating torch.dtype."""
    if value is None:
        value = DEFAULT_COMPUTE_DTYPE
    if isinstance(value, torch.dtype) and value in COMPUTE_DTYPES.values():
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in COMPUTE_DTYPES:
        return COMPUTE_DTYPES[value.removeprefix("torch.")]
    raise ValueError(f"{owner}={value!r} is not allowed{suggest(str(value), COMPUTE_DTYPES)}; use one of: "
                     f"{', '.join(COMPUTE_DTYPES)}")


def quantize_model(model: nn.Module, quantization: str = "nf4", *, blocksize: int = DEFAULT_BLOCKSIZE,
                   double_quant: bool = True, compute_dtype: str | torch.dtype | None = None,
                   skip_modules: list[str] | None = None, weight_dtype: torch.dtype | None = None) -> nn.Module:
    """Replace the model's nn.Linear layers (see the module docstring) by quantized layers, in place; returns
    the model. Layers already quantized by lorakit are left as they are, so calling it twice is harmless.

    skip_modules: names or dotted suffixes (as target_modules) of linear layers to keep dense.
    weight_dtype: the dense dtype the quantized weights stand for, when not their own (the loader's: a bf16
        checkpoint's weights quantized as stored, for an fp32 model; models/stored_bf16.py).
    """
    build = QUANTIZERS[check_quantization(quantization)]
    dtype = resolve_compute_dtype(compute_dtype)
    check_blocksize(blocksize)
    if not isinstance(double_quant, bool):
        raise ValueError(f"double_quant must be True or False, got {double_quant!r}")
    if any(isinstance(m, AdapterHolder) for m in model.modules()):
        raise ValueError("quantize_model: this model already holds adapters; quantize the base model first, then "
                         "add adapters (get_peft_model)")
    kept, mappings = kept_dense(model, skip_modules), FileMappings.read()
    for name, module in list(model.named_modules()):
        problem = foreign_layer_problem(module)
        if problem:
            raise TypeError(f"cannot quantize {name!r}: it is {problem}")
        if isinstance(module, nn.Linear):
            if not any(name == k or name.startswith(f"{k}.") for k in kept):
                model.set_submodule(name, build(module, blocksize, double_quant, dtype, weight_dtype))
                release_file_pages(module.weight.data, mappings)  # read from a mapped checkpoint: its pages go
    if not quantized_layers(model):
        raise ValueError(f"quantize_model found no nn.Linear layer to quantize in {type(model).__name__} (the output "
                         "head and skip_modules stay dense; GPT-2 style Conv1D layers are not quantized)")
    return model


def kept_dense(model: nn.Module, skip_modules: list[str] | None) -> set[str]:
    """Names of the modules whose linear layers stay dense: output heads, fp32-kept modules, skip_modules."""
    if isinstance(skip_modules, str):
        raise ValueError(f"skip_modules must be a list of module names, got the string {skip_modules!r}")
    names = output_head_names(model, "SEQ_CLS")  # lm_head, or a classifier when the model has no LM head
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or []) + list(skip_modules or [])
    if keep:
        names |= {n for n, _ in model.named_modules() if n and name_matches(keep, n)}
    return names


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QUANTIZED_LAYER_TYPES)]


def quantization_summary(model: nn.Module) -> str | None:
    """One line on the quantized layers' memory, or None when the model has none:
    "210 NF4 layers: 106,168,320 weights in 54.8 MB (bf16: 212.3 MB, 0.258x; 4.13 bits/weight)"."""
    layers = quantized_layers(model)
    if not layers:
        return None
    numel = sum(m.in_features * m.out_features for _, m in layers)
    nbytes = sum(m.nbytes for _, m in layers)
    return (f"{len(layers)} NF4 layers: {numel:,d} weights in {_size(nbytes)} (bf16: {_size(2 * numel)}, "
            f"{nbytes / (2 * numel):.3f}x; {8 * nbytes / numel:.2f} bits/weight)")


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e6:.1f} MB" if nbytes >= 100_000 else f"{nbytes / 1e3:.1f} kB"
