"""LoRA on convolutions: nn.Conv1d, nn.Conv2d, nn.Conv3d, grouped or not (PEFT's lora.Conv1d / Conv2d / Conv3d).

    h = conv(x; W0) + s * B(A(dropout(x)))

A is a convolution shaped like the base one (kernel size, stride, padding, dilation, padding mode) from the input
channels to r channels; B is a 1x1 (1, 1x1x1) convolution from r channels to the output channels, with the base
layer's groups. Tensors (PEFT's names and shapes, so files match), for g groups and kernel k:

    W0: (out, in / g, *k)        lora_A: (r, in, *k)        lora_B: (out, r / g, 1, ...)

Ungrouped (g = 1) the update is a kernel of W0's shape. As matrices W0 is (out, in*K), A (r, in*K), B (out, r),
K = prod(k), and delta W = s B A reshaped: merging, DoRA and adapter arithmetic work as for linear layers.

Grouped (g > 1), PEFT's layout: A reads every input channel and B is grouped, so the update is a full kernel over
all input channels, (out, in, *k), which the grouped W0 (out, in / g, *k) cannot hold. Hence, as in PEFT, r must
be a multiple of g, and such adapters are never merged (merge_refusal); adapter arithmetic is refused too.

DoRA on a grouped convolution follows PEFT, whose weight norm reshapes (B viewed as (out / g, r)) @ A into W0's
shape: row o of that "update" is B_cat[o // g] @ A_j, where B_cat[i] concatenates B's rows for the output channels
i*g .. i*g+g-1 and A_j is A's columns for the j = o % g-th block of input channels. It is not the norm of the
effective kernel (that kernel is not grouped), but it is exact at the start (B = 0), the method stays a valid
reparametrisation, and outputs and files match PEFT's. `norm_factors` writes it as a rank g*r product so DoRA's
code (dora.py) runs unchanged.

Unlike PEFT, A keeps the base layer's dilation and padding mode: without them a dilated convolution's LoRA branch
has the wrong output size, and a reflect/circular-padded one differs from its merged form.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from lorakit.adapter_layer import adapter_dtype
from lorakit.methods.lora.config import LoraConfig, pattern_value
from lorakit.methods.lora.init import INIT_FNS, PLAIN_INITS
from lorakit.methods.lora.layer import LoraLayer

CONV_TYPES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}  # spatial dimensions -> convolution class


class LoraConv(LoraLayer):
    """LoRA on an N-d convolution (N = 1, 2, 3), grouped or not; see the module docstring."""

    adapter_param_names = ("lora_A", "lora_B", "lora_magnitude_vector")
    init_fns = {key: INIT_FNS[key] for key in PLAIN_INITS}  # PEFT has no PiSSA/OLoRA for convolutions

    def __init__(self, base_layer: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> None:
        super().__init__(base_layer)
        self.kernel_shape = tuple(base_layer.weight.shape)
        self.conv_type = CONV_TYPES[len(self.kernel_shape) - 2]
        self.groups = base_layer.groups
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def add_adapter(self, name: str, config: LoraConfig, module_name: str) -> None:
        r = config.rank_for(module_name)
        if r % self.groups:
            source = f"LoraConfig.r={r}" if pattern_value(config.rank_pattern, module_name, None) is None \
                else f"LoraConfig.rank_pattern (r={r} for this module)"
            raise ValueError(
                f"{source} cannot adapt {module_name}: Targeting a {type(self.base_layer).__name__} with "
                f"groups={self.groups} and rank {r}. Currently, support is limited to conv layers where the rank is "
                "divisible by groups. Either choose a different rank or do not target this specific layer (set r, or "
                f"rank_pattern for this module, to a multiple of {self.groups}, or leave it out with exclude_modules).")
        if self.groups > 1:
            warnings.warn(f"LoRA adapter added to ConvNd layer with groups > 1. Merging is not supported. "
                          f"({module_name}: {type(self.base_layer).__name__} with groups={self.groups})", stacklevel=2)
        super().add_adapter(name, config, module_name)

    def _create_tensors(self, name: str, r: int) -> None:
        base = self.base_layer
        kwargs = dict(bias=False, device=self.base_weight.device, dtype=adapter_dtype(self.base_weight))
        ones = (1,) * (len(self.kernel_shape) - 2)
        self.lora_A[name] = self.conv_type(base.in_channels, r, base.kernel_size, base.stride, base.padding,
                                           base.dilation, padding_mode=base.padding_mode, **kwargs)
        self.lora_B[name] = self.conv_type(r, base.out_channels, ones, ones, groups=self.groups, **kwargs)

    # ---- the matrix view -------------------------------------------------------------------------------------
    def to_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(weight.shape[0], -1)

    def from_matrix(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.reshape(self.kernel_shape)

    def matrix_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A as (r, in*K) and B as (out, r / g): views of the live tensors (for g > 1 not factors of an update of
        W0's shape; the initialisations only need them to be A's and B's entries)."""
        r = self.r[name]
        return self.lora_A[name].weight.view(r, -1), self.lora_B[name].weight.view(self.kernel_shape[0], -1)

    def norm_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Ungrouped: the matrix factors. Grouped: PEFT's norm update (module docstring) as A' (g*r, in*K / g) and
        B' (out, g*r): A' stacks the g column blocks of A, and row o of B' holds B_cat[o // g] in block o % g."""
        a, b = self.matrix_factors(name)
        g = self.groups
        if g == 1:
            return a, b
        r, out = a.shape[0], b.shape[0]
        stacked_a = a.reshape(r, g, -1).transpose(0, 1).reshape(g * r, -1)
        rows = torch.arange(out, device=b.device)
        spread_b = b.new_zeros(out, g, r)
        spread_b[rows, rows % g] = b.reshape(out // g, r).repeat_interleave(g, dim=0)
        return stacked_a, spread_b.reshape(out, g * r)

    def magnitude_shape(self) -> tuple[int, ...]:
        return (1, self.kernel_shape[0]) + (1,) * (len(self.kernel_shape) - 2)

    # ---- running and merging -----------------------------------------------------------------------------------
    def lora_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B[name](self.lora_A[name](x)) * self.scaling[name]

    def merge_refusal(self) -> str | None:
        if self.groups == 1:
            return None
        return (f"LoRA on a grouped {type(self.base_layer).__name__} (groups={self.groups}) cannot be merged or "
                f"combined: its update is a kernel over all {self.base_layer.in_channels} input channels, which the "
                f"grouped kernel {self.kernel_shape} cannot hold (PEFT does not merge these either)")

    def delta_weight(self, name: str) -> torch.Tensor:
        reason = self.merge_refusal()
        if reason:
            raise NotImplementedError(reason)
        return super().delta_weight(name)
