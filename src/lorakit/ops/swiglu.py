"""The gated activation of Llama-style MLPs, silu(gate) * up, as one autograd function.

The module's composition keeps gate (for SiLU's backward), silu(gate) and up (for the product's) and, in
down_proj, the product itself: four (tokens x intermediate) tensors per layer, the largest activations of a
step. This function keeps gate and up only, recomputes silu(gate) in its backward, and registers the product for
recomputation (ops/recompute.py) so that down_proj keeps nothing full-width either.

    forward   h = silu(g) * u
    backward  du = dh * silu(g);  dg = silu_backward(dh * u, g)

Both directions run the same operations as autograd does for the composition: the same results bit for bit.
On the CPU in bf16 or fp32 (contiguous tensors, the kernels built), lorakit's kernel (ops/csrc/swiglu.cpp) runs
each direction in one pass (PyTorch's formulas and rounding, bit for bit): the forward, its recomputation for
down_proj's backward, and the backward from (dh, g, u). Elsewhere PyTorch's operators, and when down_proj's
backward recomputes h, the silu(g) it computes on the way is handed to this function's backward, which runs right
after (one elementwise pass saved per layer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorakit.ops import recompute
from lorakit.ops.cpu_extension import kernel_runs_for

KERNEL_DTYPES = (torch.bfloat16, torch.float32)


def kernel_runs(gate: torch.Tensor, up: torch.Tensor) -> bool:
    """Whether lorakit's CPU kernel computes silu(gate) * up (contiguous bf16 or fp32 CPU tensors of one shape)."""
    return gate.shape == up.shape and kernel_runs_for(gate, up, dtypes=KERNEL_DTYPES)


class _Product:
    """silu(gate) * up, recomputed for down_proj's backward; keeps silu(gate) for SiluMulFunction.backward."""

    __slots__ = ("silu",)

    def __init__(self) -> None:
        self.silu: torch.Tensor | None = None

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        self.silu = F.silu(gate)
        return self.silu * up

    def take_silu(self, gate: torch.Tensor) -> torch.Tensor:
        silu, self.silu = self.silu, None
        return F.silu(gate) if silu is None else silu


class SiluMulFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        if kernel_runs(gate, up):
            out = torch.ops.lorakit.silu_mul(gate, up)
            ctx.product = None
            if any(ctx.needs_input_grad):
                recompute.register(out, torch.ops.lorakit.silu_mul, gate, up)
            return out
        out = F.silu(gate) * up
        ctx.product = _Product()
        if any(ctx.needs_input_grad):
            recompute.register(out, ctx.product, gate, up)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        gate, up = ctx.saved_tensors
        # the forward ran the kernel (no _Product) on (gate, up): the gradient must suit it too
        if ctx.product is None and kernel_runs(grad_out, gate):
            return torch.ops.lorakit.silu_mul_bwd(grad_out, gate, up, ctx.needs_input_grad[0],
                                                  ctx.needs_input_grad[1])
        if ctx.product is None:
            ctx.product = _Product()
        grad_gate = grad_up = None
        if ctx.needs_input_grad[1]:
            grad_up = grad_out * ctx.product.take_silu(gate)
        if ctx.needs_input_grad[0]:
            grad_gate = torch.ops.aten.silu_backward(grad_out * up, gate)
        return grad_gate, grad_up


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up; gate and up: (..., intermediate), of one dtype."""
    return SiluMulFunction.apply(gate, up)
