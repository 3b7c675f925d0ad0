"""RMSNorm as one autograd function (Llama, Mistral, Qwen2 and the other models whose norm is
`weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype)`).

The module's composition keeps x upcast to fp32 (twice the bytes of a bf16 x) and its normalised output for the
backward; this function keeps x as it came and the per-token 1/rms (one fp32 value per token), and registers its
output for recomputation (ops/recompute.py), so that the projections reading it keep nothing either.

    forward   y = w * cast(x32 * r),  r = rsqrt(mean(x32^2, -1) + eps),  x32 = x in fp32
    backward  n = x32 * r, g = dy * w (fp32);  dx = r * (g - n * mean(g * n, -1));  dw = sum(dy * cast(n))

The forward is the module's, operation for operation (the same result bit for bit); the backward computes in
fp32 and agrees with autograd's to rounding (tests/unit/test_fused_modules.py).

On the CPU in bf16 or fp32 (input and weight of one of those dtypes, contiguous), lorakit's kernel
(ops/csrc/rms_norm.cpp) computes the normalisation from 1/rms (`_normalise`, in the forward and when the backward
recomputes the output: one pass instead of 2-4 operators, the same operations bit for bit) and the backward (one
pass instead of ~14 operators, ~4% of a 4 x 256 bf16 training step: the same fp32 math in another order of
additions). Elsewhere, PyTorch's operators.
"""

from __future__ import annotations

import torch

from lorakit.ops import recompute
from lorakit.ops.cpu_extension import kernel_runs_for


def kernel_runs(*tensors: torch.Tensor) -> bool:
    """Whether lorakit's CPU kernel computes for these tensors (contiguous CPU tensors, all bf16 or all fp32, the
    kernel built)."""
    return kernel_runs_for(*tensors, dtypes=(torch.bfloat16, torch.float32))


def _normalise(x: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor, x32: torch.Tensor | None = None
               ) -> torch.Tensor:
    """weight * (x32 * rstd).to(x.dtype): the forward's output from its 1 / rms (which passes the fp32 x it
    already has), and its recomputation."""
    if kernel_runs(x, weight):
        return torch.ops.lorakit.rms_norm_apply(x, rstd, weight)
    return weight * ((x.to(torch.float32) if x32 is None else x32) * rstd).to(x.dtype)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.to(torch.float32)
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        out = _normalise(x, rstd, weight, x32)
        ctx.save_for_backward(x, rstd, weight)
        if any(ctx.needs_input_grad):
            recompute.register(out, _normalise, x, rstd, weight)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, rstd, weight = ctx.saved_tensors
        grad_x = grad_weight = None
        if kernel_runs(grad_out, x, weight):
            grad_x, grad_weight = torch.ops.lorakit.rms_norm_bwd(grad_out, x, rstd, weight, ctx.needs_input_grad[1])
            return grad_x if ctx.needs_input_grad[0] else None, grad_weight, None
        normed = x.to(torch.float32) * rstd
        if ctx.needs_input_grad[0]:
            g = grad_out.to(torch.float32) * weight.to(torch.float32)
            grad_x = (rstd * (g - normed * (g * normed).mean(-1, keepdim=True))).to(x.dtype)
        if ctx.needs_input_grad[1]:
            contribution = grad_out.to(torch.float32) * normed.to(x.dtype).to(torch.float32)
            grad_weight = contribution.reshape(-1, contribution.shape[-1]).sum(0).to(weight.dtype)
        return grad_x, grad_weight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x.float() * rsqrt(mean(x.float()^2, -1) + eps)).to(x.dtype), x: (..., d), weight: (d,)."""
    return RMSNormFunction.apply(x, weight, float(eps))
