"""A LoRA adapter's update of a few rows in one call of lorakit's kernel (ops/csrc/lora_rows.cpp).

    u = lora_rows_(out, x, a, b, s)    # u = x a^T; out += s * u b^T in place; x (..., d_in), out (..., d_out)
    out, u = lora_linear_rows(x, weight, bias, a, b, s)   # the base product x weight^T + bias and the update
    lora_rows_gathered_(out, x, a_stack, bt_stack, scales, slots)   # the same per sequence, its adapter's slot

A decoded token's batch is a handful of rows, where the two rank-r products cost little arithmetic and the matmul
library's fixed cost per call is most of their time (~15-25 us a layer on MKL; oneDNN's is larger still):
the kernel does both on one thread in one call. Used by the LoRA layer's fused function (methods/lora/fused.py),
by mixed-adapter batches without autograd (methods/lora/mixed.py) and by the server's decoding passes
(serve/lora_ops.py) when `kernel_runs` / `gathered_kernel_runs` say so: contiguous CPU rows, fp32 or bf16, with
fp32 factors, at most MAX_ROWS rows (per sequence for the gathered form), the "auto" matmul backend (under
LORAKIT_MATMUL=aten or onednn the chosen library computes, e.g. to compare with another library bit for bit),
and the kernels built. The sums run in another order than the libraries':
equal to fp32 rounding (tests/unit/test_lora_rows.py). bf16 rows (an fp32 adapter on a bf16 base, as lorakit and
PEFT load it) are read into fp32 inside the kernel: the update is computed from the fp32 factors and added in
fp32, each output rounded to bf16 once, instead of two bf16 matmul calls and two casts of the factors per layer
and token.
"""

from __future__ import annotations

import torch

from lorakit.ops.cpu_extension import kernels_available
from lorakit.ops.matmul import requested_backend

# rows up to which the one-thread kernel beats MKL's two-thread products plus their fixed cost (docs/performance.md,
# optimisation 28); a training step's or a prompt's rows are far above
MAX_ROWS = 16
ROWS_DTYPES = (torch.float32, torch.bfloat16)  # the rows' dtypes the kernel reads (its factors: fp32)


def kernel_runs(x: torch.Tensor, lora_x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether lora_rows_ computes the update of the layer's output for input x (..., d_in) whose adapter reads
    lora_x (x itself, or its dropout): see the module's docstring. Plain code, run for every layer of every decoded
    token."""
    return (x.numel() <= MAX_ROWS * x.shape[-1] and x.dtype in ROWS_DTYPES and lora_x.dtype == x.dtype and x.is_cpu
            and x.is_contiguous() and lora_x.is_contiguous() and a.dtype == b.dtype == torch.float32
            and a.is_contiguous() and b.is_contiguous() and requested_backend() == "auto" and kernels_available())


def lora_rows_(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """u = x a^T, and out += scaling * u b^T in place, for x (..., d_in) and out (..., d_out) (contiguous, both fp32
    or both bf16; a, b fp32); returns u (rows, r), fp32."""
    return torch.ops.lorakit.lora_rows_.default(out, x, a, b, scaling)  # the overload: ~1.5 us less a call


def lora_linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                     b: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, u): `linear(x, weight, bias)` and lora_rows_ on it in one call (ops/csrc/lora_linear_rows.cpp), the same
    bits, the update's columns over the threads. For rows where both kernels run: kernel_runs(x, x, a, b) and
    lorakit.ops.matmul.linear_rows_runs(x, weight, bias)."""
    return torch.ops.lorakit.lora_linear_rows.default(x, weight, bias, a, b, scaling)


def gathered_kernel_runs(x: torch.Tensor, out: torch.Tensor, a_stack: torch.Tensor) -> bool:
    """Whether lora_rows_gathered_ computes a mixed-adapter batch's update: x (sequences, tokens, d_in) of at most
    MAX_ROWS tokens per sequence (a decoded token; any number of sequences), out the base output to add into,
    a_stack the adapters' stacked A's (methods/lora/mixed.py); the same conditions as kernel_runs otherwise."""
    return (x.dim() == 3 and x.shape[1] <= MAX_ROWS and x.dtype in ROWS_DTYPES and out.dtype == x.dtype
            and a_stack.dtype == torch.float32 and x.is_cpu and x.is_contiguous() and out.is_contiguous()
            and out.dim() == 3 and requested_backend() == "auto" and kernels_available())


def lora_rows_gathered_(out: torch.Tensor, x: torch.Tensor, a_stack: torch.Tensor, bt_stack: torch.Tensor,
                        scales: torch.Tensor, slots: torch.Tensor) -> None:
    """out[i] += scales[k] * (x[i] a_stack[k]^T) bt_stack[k] in place with k = slots[i], sequence i with its own
    adapter: out (n, T, d_out), x (n, T, d_in) (both fp32 or both bf16), a_stack (S, r, d_in), bt_stack (S, r,
    d_out) (B^T), scales (S,) (fp32), slots (n,) int64; contiguous. Sequences that share an adapter read the same
    stacked weights."""
    torch.ops.lorakit.lora_rows_gathered_.default(out, x, a_stack, bt_stack, scales, slots)
