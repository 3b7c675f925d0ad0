"""Quantized base layers (QLoRA, Dettmers et al. 2023, https://arxiv.org/abs/2305.14314): not an adapter
method but a kind of base layer. A model's linear weights are stored in NF4 (nf4.py) inside NF4Linear layers
(linear.py), which adapters wrap like an nn.Linear; convert.py quantizes a whole model. Importing this
package makes "all-linear" include NF4Linear and makes injection refuse layers quantized by other libraries
(foreign.py)."""

from lorakit.inject import register_base_layer_check, register_linear_type
from lorakit.methods.quant.convert import (
    COMPUTE_DTYPES,
    DEFAULT_COMPUTE_DTYPE,
    QUANTIZERS,
    check_quantization,
    quantization_summary,
    quantize_model,
    quantized_layers,
    resolve_compute_dtype,
)
from lorakit.methods.quant.foreign import foreign_layer_problem
from lorakit.methods.quant.linear import NF4Linear
from lorakit.methods.quant.nf4 import NF4_CODES, NF4Tensor, quantize_nf4

register_linear_type(NF4Linear)
register_base_layer_check(foreign_layer_problem)

__all__ = [
    "COMPUTE_DTYPES", "DEFAULT_COMPUTE_DTYPE", "NF4_CODES", "NF4Linear", "NF4Tensor", "QUANTIZERS",
    "check_quantization", "quantization_summary", "quantize_model", "quantize_nf4", "quantized_layers",
    "resolve_compute_dtype",
]
