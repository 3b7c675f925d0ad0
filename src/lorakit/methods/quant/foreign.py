"""Layers quantized by other libraries, which lorakit must not mistake for dense layers.

bitsandbytes' `Linear4bit` and `Linear8bitLt` subclass nn.Linear but hold packed integer weights (and their
own quantization state): wrapping them like an nn.Linear, or quantizing them again, would compute garbage.
They are recognised by their class's module and name, without importing bitsandbytes (not a dependency),
and refused with what to do instead.
"""

from __future__ import annotations

from torch import nn

FOREIGN_QUANTIZERS = {"bitsandbytes": "bitsandbytes"}  # top-level module of the layer's class -> library name


def foreign_quantized_library(module: nn.Module) -> str | None:
    """The library that quantized this layer (e.g. "bitsandbytes"), or None for a layer lorakit can read."""
    return FOREIGN_QUANTIZERS.get(type(module).__module__.split(".")[0])


def foreign_layer_problem(module: nn.Module) -> str | None:
    """Why an adapter cannot wrap `module` (a layer quantized by another library), or None."""
    library = foreign_quantized_library(module)
    if library is None:
        return None
    return (f"a {type(module).__name__} quantized by {library}, which lorakit does not wrap: its weight is packed "
            f"{library} data, not a dense matrix. Load the model without {library} quantization and let lorakit "
            "quantize it (load_model_and_tokenizer(..., quantization='nf4') or quantize_model(model); run config "
            "`quantization: nf4`), or train this model with HuggingFace PEFT")
