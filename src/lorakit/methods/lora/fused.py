"""The LoRA linear layer as one autograd function: what the training step of a LoRA model spends its time in.

    y = x W0^T + b + (s A x) B^T          A: (r, d_in), B: (d_out, r), s = lora_alpha / r

The plain module composition (base_layer(x) + lora_B(lora_A(x)) * s, layer.py) is the reference. This function
computes the same quantities with fewer passes over full-width tensors:

- when s is a power of two (alpha = 2r, the usual choice) the scaling is applied with the adapter's second
  matmul, as its alpha (or on the rank-r intermediate u = A x), never as a pass over the d_out-wide output,
  which gives the same value bit for bit; any other s (rsLoRA's alpha / sqrt(r), ...) multiplies the output as
  the reference does, so that it stays exact too;
- the adapter's term is added in the output stage of its matmul (no separate full-width add);
- the backward computes dX = dY W0 + s (dY B) A in one pass (the second product is added in the output stage
  of the first), dB = s dY^T u and dA = s (dY B)^T x, and saves only x (for dA; not even x when A is
  frozen, as in LoRA-FA) and u: no dropout or dtype-cast copies of x, no full-width intermediates; dB is
  computed as (u^T dY)^T, the tokens the inner dimension of a row-major product, which MKL runs ~2x faster in
  fp32 than the reference's dY^T u (another order of additions; under LORAKIT_MATMUL=aten the reference's own
  product, its bits);
- the matmuls go to the fastest kernel (lorakit.ops.matmul: oneDNN or MKL, by CPU, dtype and size); for a few
  fp32 rows (a decoded token's batch) both adapter products run in one call of lorakit's kernel
  (lorakit.ops.lora_rows), which sums in another order: equal to fp32 rounding; a few bf16 rows with fp32 factors
  without autograd (decoding on a bf16 base) take it too, the update in fp32 rounded into the output once.

Precision: the compute dtype is that of autocast when it is on, else the input's. With bf16 activations (bf16
base weights, or autocast) the adapter computes in bf16 too, from its fp32 master weights, and its gradients
return to fp32: autocast's semantics, without its per-op dispatch. In fp32 everything is fp32.

DoRA (dora.py) runs on the same function: given the magnitude m and the row norms ||W0 + s B A|| (computed without
gradient), the output is

    y' = scale * (x W0^T + s (A x) B^T) + b,      scale = m / ||W0 + s B A||   (fp32, one value per output)

the scaling one pass each way (ops/column_scale.py: for bf16 on the CPU, lorakit's kernel), its backward giving dy
for the LoRA backward above and m's gradient; the function keeps the unscaled output for it.

The layer (LoraLinear.forward) uses this function when exactly one unmerged adapter is active (plain LoRA, or DoRA
without active dropout) and no mixed-adapter routing is set; with dropout the adapter reads dropout(x), passed
separately. A base layer that is not a dense linear (NF4, ...) runs its own forward and backward (`base_out` mode):
the function then adds the adapter's term to that output.
"""

from __future__ import annotations

import math

import torch

from lorakit.ops import lora_rows
from lorakit.ops.column_scale import scale_columns, scale_columns_backward
from lorakit.ops.matmul import linear, linear_add, linear_rows_runs, requested_backend


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the layer computes in: autocast's when autocast is on for x's device, else x's own."""
    device = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _to(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return tensor if tensor is None or tensor.dtype == dtype else tensor.to(dtype)


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    """(..., d) -> (tokens, d), a view when possible."""
    return tensor.reshape(-1, tensor.shape[-1])


class LoraLinearFunction(torch.autograd.Function):
    """Inputs: x (..., d_in); lora_x: dropout(x), or None when the adapter reads x itself; base_out: the base
    layer's output for x when it ran its own forward (else None, and `weight` (d_out, d_in) / `bias` are the
    dense base layer's); lora_a (r, d_in), lora_b (d_out, r); scaling s; dtype: the compute dtype; magnitude and
    norm (d_out,): DoRA's m and ||W0 + s B A|| (a constant), or None."""

    @staticmethod
    def forward(ctx, x, lora_x, base_out, weight, bias, lora_a, lora_b, scaling, dtype, magnitude, norm):
        ctx.scaling, ctx.dtype, ctx.fused_base = scaling, dtype, base_out is None
        ctx.dora = magnitude is not None
        ctx.x_dtype = x.dtype
        ctx.lora_x_dtype = None if lora_x is None else lora_x.dtype
        ctx.base_out_dtype = None if base_out is None else base_out.dtype
        ctx.param_dtypes = (lora_a.dtype, lora_b.dtype, None if bias is None else bias.dtype,
                            None if magnitude is None else magnitude.dtype)
        ctx.magnitude_shape = None if magnitude is None else magnitude.shape
        ctx.power_of_two = _is_power_of_two(scaling)
        # the adapter's factors in the compute dtype, cast once a step: the backward reuses them (r-wide: a bf16
        # copy of a whole r=16 SmolLM2 adapter is 10 MB)
        a, b = _to(lora_a, dtype), _to(lora_b, dtype)
        out, lx, u = _forward(x, lora_x, base_out, weight, None if ctx.dora else bias, a, b, scaling, dtype)
        unscaled = scale = None
        if ctx.dora:  # DoRA: the unscaled output kept for m's gradient
            unscaled, scale = out, _dora_scale(magnitude, norm)
            out = scale_columns(unscaled, scale, bias)
        # x (or dropout(x)) only for A's gradient: LoRA-FA (A frozen) keeps the r-wide u alone
        saved_x = lx if lora_a.requires_grad else None
        ctx.save_for_backward(saved_x, u, weight, a, b, unscaled, scale, norm)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        saved_x, u, weight, a, b, unscaled, scale, norm = ctx.saved_tensors  # a, b: already in the compute dtype
        dtype, s = ctx.dtype, ctx.scaling
        # x, lora_x, base_out, weight, bias, lora_a, lora_b, scaling, dtype, magnitude, norm
        needs = ctx.needs_input_grad
        out_grad = _to(grad_out, dtype).contiguous()
        dy, grad_magnitude = out_grad, None  # dy: the gradient of x W0^T + s (A x) B^T
        if ctx.dora:
            dy, grad_scale = scale_columns_backward(out_grad, unscaled, scale, needs[9])
            if grad_scale is not None:
                grad_magnitude = (grad_scale / norm.reshape(-1)).to(ctx.param_dtypes[3]).view(ctx.magnitude_shape)
        if ctx.power_of_two:
            lora_dy = dy
            g = linear(dy, b.T).mul_(s)  # s dY B: (..., r)
        else:
            lora_dy = dy * s  # the reference's order: the scaling's backward comes first
            g = linear(lora_dy, b.T)
        grad_x = grad_lora_x = grad_base = grad_bias = grad_a = grad_b = None
        lora_input_grad = needs[1] if ctx.lora_x_dtype is not None else needs[0]
        if ctx.fused_base:
            if needs[0] and ctx.lora_x_dtype is None:
                grad_x = linear_add(g, a.T, linear(dy, _to(weight, dtype).T), overwrite=True)  # dY W0 + s (dY B) A
            else:
                if needs[0]:
                    grad_x = linear(dy, _to(weight, dtype).T)
                if lora_input_grad:
                    grad_lora_x = linear(g, a.T)
        else:
            grad_base = _to(dy if ctx.dora else grad_out, ctx.base_out_dtype) if needs[2] else None
            if lora_input_grad:
                grad_lora = linear(g, a.T)
                grad_x, grad_lora_x = (grad_lora, None) if ctx.lora_x_dtype is None else (None, grad_lora)
        if needs[4]:  # b is added after DoRA's scaling: its gradient is the output's
            grad_bias = _flat(out_grad).sum(0).to(ctx.param_dtypes[2])
        if needs[5]:
            grad_a = (_flat(g).T @ _flat(saved_x)).to(ctx.param_dtypes[0])  # s (dY B)^T x: (r, d_in)
        if needs[6]:
            grad_b = _weight_grad_b(_flat(lora_dy), _flat(u))
            if ctx.power_of_two:
                grad_b.mul_(s)  # s dY^T u: a power of two, the bits of dY^T (s u)
            grad_b = grad_b.to(ctx.param_dtypes[1])
        grad_x = _to(grad_x, ctx.x_dtype)
        grad_lora_x = _to(grad_lora_x, ctx.lora_x_dtype) if grad_lora_x is not None else None
        return grad_x, grad_lora_x, grad_base, None, grad_bias, grad_a, grad_b, None, None, grad_magnitude, None


def _weight_grad_b(dy: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """dY^T u, (d_out, r), from dy (tokens, d_out) and u = A x (tokens, r). As (u^T dY)^T: with the tokens inner to
    both row-major operands, MKL's fp32 product runs ~2x faster (1,024 tokens: 144 -> 66 us at 576 outputs, 619 ->
    309 at 1,536; bf16 10-15%); under LORAKIT_MATMUL=aten, the reference layer's dY^T u, bit for bit."""
    if requested_backend() == "aten":
        return dy.T @ u
    return (u.T @ dy).T


def _dora_scale(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """m / ||W0 + s B A||, (d_out,), in fp32 at least."""
    return magnitude.reshape(-1) / norm.reshape(-1)


def _forward(x, lora_x, base_out, weight, bias, lora_a, lora_b, scaling, dtype):
    """The layer's output, and the dropout input and A x (tokens, r) the backward keeps: LoraLinearFunction's
    forward, and lora_linear's whole work without autograd (inference), the same operations either way. The
    matmuls run on 2-d views, which go straight to the kernels; the input is kept as it came (ops/recompute.py
    knows a recomputable activation by its identity)."""
    xc = _to(x, dtype)
    lx = xc if lora_x is None else _to(lora_x, dtype)
    # a few rows (a decoded token): both adapter products in one kernel call, on fp32 factors; bf16 rows keep the
    # adapter's own (fp32) ones, its update rounded into the output once
    a, b = (lora_a, lora_b) if dtype == torch.bfloat16 else (_to(lora_a, dtype), _to(lora_b, dtype))
    if base_out is None and lora_rows.kernel_runs(xc, lx, a, b):
        weight, bias = _to(weight, dtype), _to(bias, dtype)
        if lora_x is None and linear_rows_runs(xc, weight, bias):  # both products in one call
            out, u = lora_rows.lora_linear_rows(xc, weight, bias, a, b, scaling)
            return out, lx, u
        out = linear(xc, weight, bias)
        return out, lx, lora_rows.lora_rows_(out, lx, a, b, scaling)
    a, b = _to(a, dtype), _to(b, dtype)
    x2 = _flat(xc)
    own_base = base_out is None  # computed here: the adapter's term may be added into it in place
    if own_base:
        base_out = linear(x2, _to(weight, dtype), _to(bias, dtype))
    else:
        base_out = _flat(_to(base_out, dtype).contiguous())
    u = linear(x2 if lora_x is None else _flat(lx), a)
    if _is_power_of_two(scaling):
        out = linear_add(u, b, base_out, alpha=scaling, overwrite=own_base)  # base + s (A x) B^T, s in the matmul
    else:  # where the reference puts it, so that the result is the same bit for bit
        out = linear(u, b).mul_(scaling).add_(base_out)
    return out.view(*x.shape[:-1], out.shape[-1]), lx, u


def _is_power_of_two(value: float) -> bool:
    mantissa, _ = math.frexp(value)
    return mantissa == 0.5  # also for 2**-k: multiplying by it is exact (barring under/overflow)


def lora_linear(x: torch.Tensor, lora_x: torch.Tensor | None, base_out: torch.Tensor | None,
                weight: torch.Tensor | None, bias: torch.Tensor | None, lora_a: torch.Tensor, lora_b: torch.Tensor,
                scaling: float, dtype: torch.dtype | None = None, magnitude: torch.Tensor | None = None,
                norm: torch.Tensor | None = None) -> torch.Tensor:
    """base(x) + s B A lora_x (lora_x defaults to x), or DoRA's scaled form with magnitude and norm; see
    LoraLinearFunction for the arguments; dtype: the compute dtype when the caller has it (compute_dtype(x)).
    Without autograd (inference) the same operations run without the autograd function's bookkeeping."""
    dtype = compute_dtype(x) if dtype is None else dtype
    if not torch.is_grad_enabled():
        if magnitude is None:
            return _forward(x, lora_x, base_out, weight, bias, lora_a, lora_b, float(scaling), dtype)[0]
        out = _forward(x, lora_x, base_out, weight, None, lora_a, lora_b, float(scaling), dtype)[0]
        return scale_columns(out, _dora_scale(magnitude, norm), bias)
    return LoraLinearFunction.apply(x, lora_x, base_out, weight, bias, lora_a, lora_b, float(scaling), dtype,
                                    magnitude, norm)
