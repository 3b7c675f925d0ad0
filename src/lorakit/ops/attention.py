"""Causal self-attention for training on the CPU, bf16 and fp32: lorakit's kernel behind transformers' attention
interface.

    use_cpu_attention(model)       # once the model is on the CPU; True when the kernel is in (train.cpu_attention)
    restore_attention(model)       # the implementation the model had before
    causal_attention(q, k, v, scale, key_ranges)   # the autograd function: q (B, H, L, D), k and v (B, KV, L, D)

PyTorch's CPU flash attention multiplies its blocks with cpublas::brgemm, which runs at ~100 GFLOP/s on CPUs
without AMX (the AVX512-BF16 EPYC this project first measured on); attention took a quarter of a bf16 LoRA step.
ops/csrc/causal_attention.cpp computes the same softmax(scale Q K^T, causal) V, and its backward, on oneDNN
matmuls (260-400 GFLOP/s on the same blocks) with the softmax fused in row loops: 2.2-3.5x faster than PyTorch's
kernel from 128 to 2,048 tokens (docs/performance.md, optimisation 13). On CPUs with AMX, brgemm has its fast
path and PyTorch's forward is 1.4-2.1x faster than the kernel's, but its backward stays 1.6-3.2x slower: there
the forward is PyTorch's flash kernel (its output and log-sum-exp) and the backward the kernel's
(optimisation 24). Precision: the kernel's score and dP matmuls give bf16 outputs as in transformers' eager
attention (PyTorch's flash kernel keeps the scores fp32); the softmax and the dK / dV sums over a group's heads
are fp32. tests/unit/test_cpu_attention.py checks both forwards against fp32 SDPA. In fp32 (the exact training
path) everything is fp32 and the forward is the kernel's on every CPU: forward and backward 1.19x PyTorch's fp32
flash kernel at 4 x 256 (optimisation 51), as close to fp64 attention as SDPA's own fp32 result.

The kernel is registered as the attention implementation "lorakit_cpu" (transformers' AttentionInterface, with
SDPA's mask function) and is used only where it computes exactly what SDPA would: CPU tensors, all bf16 or all
fp32, causal, no mask or one that gives every query one run of keys ending at or before itself (the trainer's
right-padded batches and packed sequences: mask_key_ranges; left padding and custom masks go to SDPA), no
dropout, as many keys as queries (no KV cache prefix), no soft-capping, sliding window or attention sinks; and
only where it is the faster one: not with fewer (batch row, head, 256-token block) items than threads, nor in
fp32 below 128 tokens (FP32_MIN_LENGTH).
Everything else goes to transformers' SDPA function unchanged, so a model switched to it stays correct wherever
it runs. A model whose implementation is not "sdpa" (eager, flex, flash) is left alone. The kernel is compiled on
first use (ops/cpu_extension.py); where it cannot be (no C++ compiler), a warning says so and SDPA stays.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import nn

from lorakit.ops.cpu_extension import kernels_available
from lorakit.ops.cpu_info import cpu_has_amx

IMPLEMENTATION = "lorakit_cpu"
KERNEL_DTYPES = (torch.bfloat16, torch.float32)
# fp32 sequences shorter than this stay on SDPA: there PyTorch's fp32 kernel is the faster one (forward and backward,
# 2 threads: 1 x 64 0.34 vs 0.55 ms, 8 x 64 2.09 vs 2.47, 32 x 64 9.9 vs 10.3; from 128 tokens the kernel is level or
# faster: 1 x 128 1.17 vs 1.06, 4 x 256 11.3 vs 10.0, 1 x 512 12.3 vs 8.7). In bf16 the kernel's backward is the
# faster one at every length.
FP32_MIN_LENGTH = 128
_BEFORE = "_lorakit_attention_before"  # on the model: the implementation it had
# kwargs of transformers' attention call that change the math away from plain causal softmax attention
_UNSUPPORTED_KWARGS = ("softcap", "sliding_window", "s_aux", "sinks", "position_bias", "head_mask", "cache")
_checked_mask: dict = {}  # "entry": (weakref to the last mask checked, its version, its key ranges or None)


class CausalAttentionFunction(torch.autograd.Function):
    """softmax(scale Q K^T, causal) V for bf16 CPU tensors; K and V shared by groups of query heads; with
    `key_ranges` ((B, L, 2) int64) query i of row b sees keys key_ranges[b, i, 0] <= j < key_ranges[b, i, 1]."""

    @staticmethod
    def forward(ctx, q, k, v, key_ranges, scale: float):
        out, lse = _forward(q, k, v, key_ranges, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.key_ranges, ctx.scale = key_ranges, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
        dq, dk, dv = torch.ops.lorakit.causal_attention_bwd(grad_out, q, k, v, out, lse, ctx.key_ranges, ctx.scale)
        return dq, dk, dv, None, None


def _forward(q, k, v, key_ranges, scale: float):
    """The attention output and each query's log-sum-exp ((B, H, L) fp32, natural log of the scaled scores'
    sum of exponentials: the backward's convention). On CPUs with AMX and with no key ranges (plain causal),
    PyTorch's flash kernel, the faster forward there; the kernel's otherwise."""
    if key_ranges is None and q.dtype == torch.bfloat16 and cpu_has_amx():
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
        return out, lse.contiguous()
    return torch.ops.lorakit.causal_attention_fwd(q, k, v, key_ranges, scale)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                     key_ranges: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, L, D) attention output; the kernel must be loaded (cpu_extension.kernels_available())."""
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return CausalAttentionFunction.apply(q, k, v, key_ranges, scale)


def mask_key_ranges(mask: torch.Tensor, batch: int, length: int) -> torch.Tensor | None:
    """Each query's visible keys as (batch, length, 2) [start, end) when `mask` (transformers' (B or 1, 1, L, L)
    boolean SDPA mask, True = attend) lets every query see one non-empty run of keys ending at or before itself:
    causal, right padding (padded queries see the real keys), packed sequences (each sees its own sequence), which
    the kernel computes. None for any other mask (left padding leaves padded queries no key; custom masks).
    Checked once per mask: every layer of a forward gets the same tensor."""
    cached = _checked_mask.get("entry")
    if cached is not None and cached[0]() is mask and cached[1] == mask._version:
        return cached[2]
    ranges = None
    if mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[0] in (1, batch) and mask.shape[1] == 1 \
            and mask.shape[2:] == (length, length):
        rows = mask[:, 0]
        start = rows.to(torch.uint8).argmax(-1)  # first visible key (0 for a row with none: caught below)
        end = length - rows.flip(-1).to(torch.uint8).argmax(-1)  # one past the last
        positions = torch.arange(length, device=mask.device)
        expected = (positions >= start[..., None]) & (positions < end[..., None])
        if bool(rows.any(-1).all()) and bool((end <= positions + 1).all()) and torch.equal(rows, expected):
            ranges = torch.stack((start, end), -1).to(torch.int64).expand(batch, length, 2).contiguous()
    _checked_mask["entry"] = (weakref.ref(mask), mask._version, ranges)
    return ranges


def enough_work(query: torch.Tensor) -> bool:
    """The kernel runs one thread per (batch row, head, 256-token block); with fewer of those than threads (a
    small batch on a many-core machine) PyTorch's kernel, which splits finer, keeps every core busy. In fp32, short
    sequences too (FP32_MIN_LENGTH)."""
    batch, heads, length = query.shape[:3]
    if query.dtype == torch.float32 and length < FP32_MIN_LENGTH:
        return False
    return batch * heads * -(-length // 256) >= torch.get_num_threads()


def kernel_applies(module: nn.Module, query, key, value, attention_mask, dropout: float, is_causal, kwargs) -> bool:
    """True when the kernel computes what transformers' SDPA function would for this call, on a CPU and a call
    where it is the faster of the two."""
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    tensors = (query, key, value)
    return (bool(is_causal) and not dropout and query.dim() == 4
            and query.shape[2] > 1 and query.shape[2] == key.shape[2] == value.shape[2]
            and key.shape == value.shape and query.shape[-1] == key.shape[-1]
            and key.shape[1] > 0 and query.shape[1] % key.shape[1] == 0
            and query.dtype in KERNEL_DTYPES and all(t.device.type == "cpu" and t.dtype == query.dtype for t in tensors)
            and enough_work(query)
            and not kwargs.get("output_attentions") and all(kwargs.get(name) is None for name in _UNSUPPORTED_KWARGS)
            and (attention_mask is None or mask_key_ranges(attention_mask, query.shape[0], query.shape[2]) is not None))


def attention_forward(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0,
                      scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers' attention-function signature; returns ((B, L, H, D) output, None) as SDPA's does."""
    if kernel_applies(module, query, key, value, attention_mask, dropout, is_causal, kwargs):
        ranges = None if attention_mask is None else mask_key_ranges(attention_mask, query.shape[0], query.shape[2])
        return causal_attention(query, key, value, scaling, ranges).transpose(1, 2), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def use_cpu_attention(model: nn.Module) -> bool:
    """Switch a transformers model (or a PeftModel around one) from "sdpa" to the kernel's implementation."""
    base = _transformers_model(model)
    if base is None or getattr(base.config, "_attn_implementation", None) != "sdpa" or not kernels_available():
        return False
    _register()
    base.set_attn_implementation(IMPLEMENTATION)
    setattr(base, _BEFORE, "sdpa")
    return True


def restore_attention(model: nn.Module) -> None:
    """Give the model back the implementation use_cpu_attention replaced (nothing when it replaced none)."""
    base = _transformers_model(model)
    before = getattr(base, _BEFORE, None) if base is not None else None
    if before is not None:
        base.set_attn_implementation(before)
        delattr(base, _BEFORE)


def _transformers_model(model: nn.Module):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base if hasattr(base, "set_attn_implementation") and hasattr(base, "config") else None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import (
        ALL_MASK_ATTENTION_FUNCTIONS,
        AttentionMaskInterface,
    )

    AttentionInterface.register(IMPLEMENTATION, attention_forward)
    # the masks SDPA gets (None where causal alone is enough): the kernel runs exactly when there is none
    AttentionMaskInterface.register(IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
