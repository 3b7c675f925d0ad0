"""A layer output's columns times an fp32 vector, one value per output feature: DoRA's `m / ||W0 + s B A||`.

    forward   out = (y * scale [+ bias]).to(y.dtype)
    backward  dy = (grad * scale).to(y.dtype);  dscale = sum over the rows of grad * y, in fp32

For a contiguous bf16 CPU y both directions run one pass of lorakit's kernel (ops/csrc/dora_scale.cpp), where
PyTorch's promotion runs a mixed-dtype loop into fp32 temporaries and a cast: the output and dy bit for bit the
promoted expression's, dscale summed in fp32 per thread (equal to fp32 rounding). Anything else runs as written.
These are plain functions: the caller's autograd function (methods/lora/fused.py) calls the backward.
"""

from __future__ import annotations

import torch

from lorakit.ops.cpu_extension import kernel_runs_for


def _kernel_runs(y: torch.Tensor, scale: torch.Tensor) -> bool:
    return scale.dtype == torch.float32 and scale.dim() == 1 and scale.is_cpu and kernel_runs_for(y)


def scale_columns(y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """(y * scale + bias).to(y.dtype) for y (..., d_out), scale (d_out,); bias (d_out,) or None, added unscaled."""
    if bias is None and _kernel_runs(y, scale):
        return torch.ops.lorakit.scale_columns(y, scale.contiguous())
    out = y * scale
    return (out if bias is None else out + bias).to(y.dtype)


def scale_columns_backward(grad: torch.Tensor, y: torch.Tensor, scale: torch.Tensor,
                           need_scale: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dy, dscale) of scale_columns for the output's gradient `grad`: dy in y's dtype, dscale (d_out,) in the
    promoted dtype of grad, y and scale (None unless need_scale)."""
    grad = grad.contiguous()
    if _kernel_runs(y, scale) and grad.dtype == y.dtype:
        return torch.ops.lorakit.scale_columns_bwd(grad, y, scale.contiguous(), need_scale)
    wide = grad.to(torch.promote_types(torch.promote_types(grad.dtype, y.dtype), scale.dtype))
    dy = (wide * scale).to(y.dtype)
    dscale = (wide * y).reshape(-1, y.shape[-1]).sum(0) if need_scale else None
    return dy, dscale
