"""Cross-entropy of a language-model head, computed from the final hidden states in chunks of tokens.

    loss = sum over tokens t with labels[t] != ignore_index of  logsumexp(h_t W^T + b) - (h_t W^T + b)[labels[t]]

The usual way materialises the logits of every position (tokens x vocabulary: 1,024 x 49,152 for SmolLM2 at
4 x 256 tokens, 200 MB in fp32), copies them for the causal shift and for the fp32 upcast, and keeps them for
the backward. Here:

- only the positions that have a label are multiplied by the head (a prompt masked with -100 costs nothing,
  nor does the last position of each row, whose label the causal shift drops);
- the logits exist one chunk of tokens at a time (CHUNK_LOGITS: 48 MB in bf16, 32 MB in fp32),
  upcast to fp32 for the softmax as the usual way does, but only SOFTMAX_ROWS rows at a time; softmax - onehot
  is written back over them (peak: the chunk in its dtype plus 3 MB, instead of 6 bytes per logit);
- when a gradient is needed, it is computed in the forward, chunk by chunk: d loss / d logits = softmax - onehot
  is known there, so dh = (softmax - onehot) W (and dW, db when the head trains) are accumulated at once and
  the backward only scales them by the incoming gradient. Nothing is recomputed and nothing vocabulary-wide is
  kept: the saved state is dh, tokens x hidden size.

On the CPU with bf16 or fp32 logits, the softmax, the loss and softmax - onehot of a chunk run in lorakit's kernel
(ops/csrc/cross_entropy.cpp): one exponential per logit instead of two, one pass over each row instead of five
(docs/performance.md, optimisations 16 and 51); elsewhere (CUDA, fp16) PyTorch's operators, SOFTMAX_ROWS rows at a
time.

The result equals F.cross_entropy(logits.float(), labels, reduction="sum") to fp32 rounding (the sum runs in
another order). Matmuls go through lorakit.ops.matmul (oneDNN for CPU fp32).
"""

from __future__ import annotations

import torch

from lorakit.ops.cpu_extension import kernel_runs_for
from lorakit.ops.matmul import linear

IGNORE_INDEX = -100
# logits per chunk, by bytes per logit of the compute dtype: 512 tokens of a 49k vocabulary in bf16 (48 MB), 170
# in fp32 (32 MB). The head's bf16 matmul runs faster on 512 rows than on 170 (the step 2-3% faster); the fp32
# step gains nothing from 256 and would pay the memory (docs/performance.md, optimisation 18)
CHUNK_LOGITS = {2: 24 * 2 ** 20, 4: 8 * 2 ** 20}
SOFTMAX_ROWS = 16  # rows of a chunk upcast to fp32 at a time (3 MB at 49k); the rest stays in the logits' dtype


class LinearCrossEntropy(torch.autograd.Function):
    """hidden (N, d), weight (V, d), bias (V,) or None, labels (N,) -> summed loss (fp32 scalar)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, chunk_logits):
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
        rows = (labels != ignore_index).nonzero().squeeze(1)
        targets = labels[rows]
        picked = hidden[rows]
        dtype = hidden.dtype
        w = weight if weight.dtype == dtype else weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        step = max(1, chunk_logits // max(weight.shape[0], 1))
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_picked = torch.empty_like(picked) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if want_bias else None
        for start in range(0, rows.numel(), step):
            h = picked[start:start + step]
            target = targets[start:start + step]
            logits = linear(h, w, b)
            want_grad = want_hidden or want_weight or want_bias
            if kernel_runs(logits):  # softmax - onehot written over the logits, in the kernel
                total += torch.ops.lorakit.cross_entropy_rows(logits, target, want_grad).sum()
            else:
                total += _softmax_rows(logits, target, want_grad)
            if not want_grad:
                continue
            dlogits, dlogits_c = logits.float() if want_bias else None, logits
            if want_hidden:
                grad_picked[start:start + step] = linear(dlogits_c, w.T)
            if want_weight:
                grad_weight += (dlogits_c.T @ h).float()
            if want_bias:
                grad_bias += dlogits.sum(0)
        ctx.save_for_backward(rows, grad_picked, grad_weight, grad_bias)
        ctx.hidden_shape, ctx.param_dtypes = hidden.shape, (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        rows, grad_picked, grad_weight, grad_bias = ctx.saved_tensors
        grad_hidden = None
        if grad_picked is not None:
            grad_hidden = grad_picked.new_zeros(ctx.hidden_shape)
            grad_hidden[rows] = grad_picked * grad_total.to(grad_picked.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(ctx.param_dtypes[0])
        if grad_bias is not None:
            grad_bias = (grad_bias * grad_total).to(ctx.param_dtypes[1])
        return grad_hidden, grad_weight, grad_bias, None, None, None


def kernel_runs(logits: torch.Tensor) -> bool:
    """Whether lorakit's CPU kernel computes the softmax of these logits (contiguous bf16 or fp32 on the CPU, the
    kernel built)."""
    return kernel_runs_for(logits, dtypes=(torch.bfloat16, torch.float32))


def _softmax_rows(logits: torch.Tensor, target: torch.Tensor, want_grad: bool) -> torch.Tensor:
    """Summed loss of a chunk; with want_grad, softmax - onehot written over the logits (in their dtype)."""
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    for row in range(0, logits.shape[0], SOFTMAX_ROWS):  # fp32 only SOFTMAX_ROWS rows at a time
        rows_logits, rows_target = logits[row:row + SOFTMAX_ROWS], target[row:row + SOFTMAX_ROWS, None]
        log_probs = torch.log_softmax(rows_logits, dim=1, dtype=torch.float32)
        picked_log_probs = log_probs.gather(1, rows_target)
        total -= picked_log_probs.sum()
        if want_grad:
            dlogits = log_probs.exp_()
            dlogits.scatter_(1, rows_target, picked_log_probs.exp_().sub_(1.0))
            rows_logits.copy_(dlogits)
    return total


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         bias: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX,
                         chunk_logits: int | None = None) -> torch.Tensor:
    """Summed cross-entropy of the head (weight, bias) over `hidden` (N, d) against `labels` (N,), fp32 scalar.
    Positions labelled `ignore_index` take no part (and cost nothing). `chunk_logits`: logits per chunk (default:
    CHUNK_LOGITS for hidden's dtype)."""
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(f"linear_cross_entropy: hidden must be (N, d) and labels (N,), got {tuple(hidden.shape)} "
                         f"and {tuple(labels.shape)}")
    if chunk_logits is None:
        chunk_logits = CHUNK_LOGITS.get(hidden.element_size(), CHUNK_LOGITS[4])
    return LinearCrossEntropy.apply(hidden, weight, bias, labels, ignore_index, chunk_logits)
