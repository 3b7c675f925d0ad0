"""Rotary position embedding of the queries and keys as one autograd function.

    q_embed, k_embed = apply_rotary(q, k, cos, sin)   # transformers' apply_rotary_pos_emb, bit for bit

transformers computes `q * cos + rotate_half(q) * sin` (and the same for k) as ~14 operators (slices, a negation,
a concatenation, products, sums), and autograd's backward as ~20 more: ~1 ms of every layer of a 4 x 256 bf16
step on SmolLM2, ~4 ms in fp32. On the CPU in bf16 or fp32 (q, k, cos and sin CPU tensors of one of those dtypes,
q and k with a contiguous last dimension: the transposed views of the projections' outputs), lorakit's kernel
(ops/csrc/rotary.cpp) makes one pass each way with the composition's operations in its order: the same outputs
and gradients bit for bit (tests/unit/test_rotary.py). Elsewhere, and when cos or sin needs a gradient,
transformers' own function.
"""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from lorakit.ops.cpu_extension import kernels_available

KERNEL_DTYPES = (torch.bfloat16, torch.float32)


class RotaryFunction(torch.autograd.Function):
    """q, k: (B, heads, L, D) bf16 or fp32 with a contiguous last dimension; cos, sin: (B or 1, L, D), same dtype."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        q_embed, k_embed = torch.ops.lorakit.rotary_fwd(q, k, cos, sin)
        ctx.save_for_backward(cos, sin)
        ctx.shapes = (q.shape, k.shape)
        return q_embed, k_embed

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        grads = [cos.new_zeros(shape) if grad is None else grad if grad.stride(-1) == 1 else grad.contiguous()
                 for grad, shape in zip((grad_q, grad_k), ctx.shapes)]
        return *torch.ops.lorakit.rotary_bwd(*grads, cos, sin), None, None


def kernel_runs(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether lorakit's kernel computes the embedding for these tensors (see the module's docstring)."""
    return (q.dtype in KERNEL_DTYPES
            and all(t.dtype == q.dtype and t.is_cpu and t.stride(-1) == 1 for t in (q, k, cos, sin))
            and q.dim() == k.dim() == 4 and cos.dim() == sin.dim() == 3 and not (cos.requires_grad or sin.requires_grad)
            and kernels_available())


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """transformers' apply_rotary_pos_emb(q, k, cos, sin) (heads on dimension 1), in lorakit's kernel where it runs."""
    if kernel_runs(q, k, cos, sin):
        return RotaryFunction.apply(q, k, cos, sin)
    return apply_rotary_pos_emb(q, k, cos, sin)
