"""NF4Linear: a frozen linear layer whose weight is stored in NF4 (QLoRA, https://arxiv.org/abs/2305.14314).

    y = x W^T + b,   W = dequantize(NF4 codes, scales), formed in `compute_dtype` on the fly

The packed codes and scales are buffers (state-dict and safetensors friendly, never trained). The forward
dequantizes W, multiplies, and drops W; the backward dequantizes W again for grad_x = grad_y W instead of
keeping it, since holding the dense weight until the backward would undo the memory saving. Nothing is
cached across steps. The weight itself never receives a gradient: LoRA trains beside it (QLoRA Sec. 3).

An adapter layer wrapping this layer reads `weight` (an `NF4Tensor`: shape (out, in), original dtype,
device), asks `dequantized_weight()` when it needs W (merging), and writes a merged W back through
`store_dense_weight(W)`, which returns a dense nn.Linear to take this layer's place: folding an adapter into
4-bit codes would round most of it away.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from lorakit.methods.quant.nf4 import DEFAULT_BLOCKSIZE, NF4Tensor, quantize_nf4
from lorakit.ops.matmul import linear

BUFFER_PREFIX = "weight_"  # buffer names: weight_packed, weight_absmax (or weight_absmax_codes/_scales/_offset)


class _NF4Matmul(torch.autograd.Function):
    """x W^T with W dequantized in forward and again in backward (nothing but a reference to the codes is
    saved); W is frozen, so only grad_x is computed."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: NF4Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
        ctx.weight, ctx.compute_dtype, ctx.x_dtype = weight, compute_dtype, x.dtype
        return linear(x.to(compute_dtype), weight.dequantize(compute_dtype)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        weight = ctx.weight.dequantize(ctx.compute_dtype)
        return linear(grad_out.to(ctx.compute_dtype), weight.T).to(ctx.x_dtype), None, None


class NF4Linear(nn.Module):
    """A linear layer with its weight in NF4. Build with `NF4Linear.from_linear(linear, ...)`.

    compute_dtype: the dtype of the dequantized weight and of the matmul (the input is cast to it, the output
    back to the input's dtype). The quantization constants stay fp32 whatever `.to(dtype)` does to the model.
    """

    def __init__(self, weight: NF4Tensor, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-D weight (out_features, in_features), got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.blocksize = weight.blocksize
        self.weight_dtype = weight.dtype  # the dense dtype: of dequantized_weight() and of a merged layer
        self.compute_dtype = compute_dtype
        self._buffer_keys = tuple(weight.tensors())
        for key, tensor in weight.tensors().items():
            self.register_buffer(BUFFER_PREFIX + key, tensor)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = DEFAULT_BLOCKSIZE, double_quant: bool = True,
                    compute_dtype: torch.dtype = torch.bfloat16,
                    weight_dtype: torch.dtype | None = None) -> "NF4Linear":
        """Quantize an nn.Linear's weight (its bias stays dense); weight_dtype: quantize_nf4's dtype."""
        return cls(quantize_nf4(linear.weight, blocksize, double_quant, weight_dtype), linear.bias, compute_dtype)

    @property
    def weight(self) -> NF4Tensor:
        """The quantized weight over this layer's current buffers (shape (out, in), dtype the original)."""
        tensors = {key: getattr(self, BUFFER_PREFIX + key) for key in self._buffer_keys}
        return NF4Tensor.from_tensors(tensors, (self.out_features, self.in_features), self.weight_dtype,
                                      self.blocksize)

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes

    @property
    def frozen_weight_numel(self) -> int:
        """The weights held as codes rather than parameters, counted as (frozen) parameters by
        `lorakit.model.parameter_counts`."""
        return self.in_features * self.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _NF4Matmul.apply(x, self.weight, self.compute_dtype)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    # ---- what an adapter layer needs (adapter_layer.py) ----------------------------------------------------
    def dequantized_weight(self) -> torch.Tensor:
        """W as a dense (out, in) tensor in the original dtype (a fresh copy; the codes are unchanged)."""
        return self.weight.dequantize(self.weight_dtype)

    def store_dense_weight(self, weight: torch.Tensor) -> nn.Linear:
        """A dense nn.Linear holding `weight` (and this layer's bias), to replace this layer: merging an adapter
        into 4 bits would round the update away. The merged layer takes ~4x (bf16) to 8x (fp32) the memory."""
        warnings.warn(
            f"merging into an NF4 layer ({self.in_features} -> {self.out_features}): it becomes a dense "
            f"{str(weight.dtype).removeprefix('torch.')} nn.Linear, since 4-bit codes cannot hold the merged "
            "weight precisely. A merged QLoRA model is a 16/32-bit model (merge_and_unload returns it dense).",
            UserWarning, stacklevel=2)
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=weight.device, dtype=weight.dtype)
        dense.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        if self.bias is not None:
            dense.bias = self.bias  # the same parameter: a trained bias (LoRA bias="all") keeps training
        return dense

    # ---- keep the quantization constants fp32 ----------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        """`.to(dtype)` / `.half()` cast every floating buffer; the scales must stay fp32 (rounding them to
        bf16 would change every weight of their block), so only their device follows. The dense dtype follows
        the cast as a dense weight would, so that a merged layer matches the rest of the model."""
        kept = {name: buf for name, buf in self._buffers.items() if buf is not None and buf.is_floating_point()}
        device = self._buffers[BUFFER_PREFIX + "packed"].device
        self.weight_dtype = fn(torch.empty(0, dtype=self.weight_dtype, device=device)).dtype
        super()._apply(fn, recurse)
        for name, original in kept.items():
            moved = self._buffers[name]
            if moved.dtype != original.dtype:
                self._buffers[name] = original.to(moved.device)
        return self

    def extra_repr(self) -> str:
        weight = self.weight
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}, double_quant={weight.double_quant}, "
                f"compute_dtype={str(self.compute_dtype).removeprefix('torch.')}")
