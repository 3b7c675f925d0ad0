"""The serving LoRA layer: one frozen base matmul for the whole batch, a low-rank update per row's adapter.

S-LoRA (Sheng et al. 2023, https://arxiv.org/abs/2311.03285) and Punica (Chen et al. 2023,
https://arxiv.org/abs/2310.18547). Every targeted linear layer of the base model is replaced by a
`ServingLoraLinear` that keeps the adapters resident in compute memory stacked along a slot axis:

    lora_A: (S, r_max, d_in)     slot i holds A_i, zero-padded from rank r_i to r_max
    lora_B: (S, r_max, d_out)    slot i holds (s_i B_i)^T: the scaling s_i = alpha/r (or alpha/sqrt(r),
                                 rsLoRA, per module with rank/alpha patterns) is folded in once, at load
    (in the base's dtype; fp32 for a bf16 base on the CPU, for the rows kernel)

Slot 0 is all zeros: the base model. For a batch x: (n, T, d_in) whose row b uses adapter slot k_b,

    h_b = W0 x_b + x_b A_{k_b}^T (s B_{k_b})^T

Zero padding makes adapters of different ranks compute side by side: the padded columns of A and rows of
B contribute exactly 0. Nothing is ever merged into W0, so a batch may mix any resident adapters.

Three kernels add the low-rank part (`LORA_KERNELS`), each with a fixed number of ops per layer whatever the
adapters in the batch: "gathered" copies each row's (A, B) out of the stacks and runs two batched matmuls;
"segmented" sorts the rows into one segment per adapter (padded to the longest), reads each adapter's
weights once and runs one batched matmul pair over the segments (Punica's SGMV, without a custom
kernel); "rows" is lorakit's CPU kernel for a few tokens per row (lorakit.ops.lora_rows, as the library's
mixed batches decode): one call that reads each row's adapter from the fp32 stacks (fp32 or bf16 rows), and
"segmented" wherever it does not run (CUDA). The gathered and segmented kernels compute in the rows' dtype (fp32
stacks cast after the gather). By default ("auto") decoding passes use "rows" and
prefill passes "gathered", which was fastest for each on CPU (docs/serving.md); `lorakit bench serve --kernel`
compares them.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.ops import lora_rows
from lorakit.ops.matmul import linear_layer
from lorakit.ops.segments import Segments, segment_rows, segmented_delta

BASE_SLOT = 0  # the all-zero slot: rows that use the base model alone


def gathered_lora(x: torch.Tensor, out: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                  batch: "BatchAdapters") -> torch.Tensor:
    """out (n, T, d_out) + x (n, T, d_in) A_k^T (sB_k)^T, each row's A and B gathered from the stacks: a copy
    of r (d_in + d_out) weights per row (in the rows' dtype), then two bmm (the second fused with the addition)."""
    a = lora_a.index_select(0, batch.row_slots).to(x.dtype)  # (n, r, d_in)
    b = lora_b.index_select(0, batch.row_slots).to(x.dtype)  # (n, r, d_out)
    return torch.baddbmm(out, torch.bmm(x, a.transpose(1, 2)), b)


def segmented_lora(x: torch.Tensor, out: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                   batch: "BatchAdapters") -> torch.Tensor:
    """The same sum with the rows sorted into one segment per adapter (Punica's SGMV, lorakit.ops.segments):
    one bmm pair that reads each adapter's weights once."""
    segments = batch.segments
    a, b = segments.select(lora_a).to(x.dtype), segments.select(lora_b).to(x.dtype)  # in the rows' dtype
    return out + segmented_delta(x, a.transpose(1, 2), b, segments)


def rows_kernel_lora(x: torch.Tensor, out: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                     batch: "BatchAdapters") -> torch.Tensor:
    """The same sum added into out in place by lorakit's CPU kernel (lorakit.ops.lora_rows: a few tokens per row,
    fp32 stacks, each row's adapter read from them in one call); segmented_lora where the kernel does not run."""
    if not lora_rows.gathered_kernel_runs(x, out, lora_a):
        return segmented_lora(x, out, lora_a, lora_b, batch)
    lora_rows.lora_rows_gathered_(out, x, lora_a, lora_b, batch.slot_scales(lora_a.shape[0]), batch.row_slots)
    return out


LORA_KERNELS = {"gathered": gathered_lora, "segmented": segmented_lora, "rows": rows_kernel_lora}
KERNEL_CHOICES = ("auto", *LORA_KERNELS)


class BatchAdapters:
    """Which adapter slot each row of the current forward pass uses, and the kernel that adds the low-rank
    part; shared by every serving layer, set once per pass by the engine (not once per layer).

    kernel "auto" picks per pass: "rows" for decoding passes (one token per row: copying every row's weights
    would cost more than the row's own matmuls; "segmented" where lorakit's kernel does not run) and "gathered"
    for prefill passes (many tokens per row share one copy of its weights, and no row is gathered or padded)."""

    def __init__(self, kernel: str = "auto") -> None:
        if kernel not in KERNEL_CHOICES:
            raise ValueError(f"kernel must be one of {KERNEL_CHOICES}, got {kernel!r}")
        self.kernel = kernel
        self.add_lora = None  # the kernel of this pass; None: no row uses an adapter
        self.row_slots: torch.Tensor | None = None  # (n,) slot of each row
        # segmented (and rows, for its fallback): the rows grouped by slot, built on first use: the rows kernel
        # rarely needs them (bf16 stacks, CUDA), and a pass that does not costs nothing
        self._grouping: tuple[list[int], torch.device] | None = None
        self._segments: Segments | None = None
        self._slot_scales: dict[int, torch.Tensor] = {}  # slots -> the rows kernel's scalings: 0 for the base slot

    def set(self, row_slots: list[int], tokens_per_row: int, device: torch.device) -> None:
        if all(slot == BASE_SLOT for slot in row_slots):
            self.clear()
            return
        kernel = self.kernel if self.kernel != "auto" else "rows" if tokens_per_row == 1 else "gathered"
        self.add_lora = LORA_KERNELS[kernel]
        self.row_slots = torch.tensor(row_slots, dtype=torch.long, device=device)
        self._grouping = (row_slots, device) if kernel in ("segmented", "rows") else None
        self._segments = None

    @property
    def segments(self) -> Segments | None:
        """The pass's rows grouped by slot (segmented and rows passes; None for the others): base rows form a
        segment of the all-zero slot 0."""
        if self._segments is None and self._grouping is not None:
            self._segments = segment_rows(*self._grouping)
        return self._segments

    def slot_scales(self, num_slots: int) -> torch.Tensor:
        """(num_slots,) fp32: 1 for every slot (s is folded into B), 0 for the base slot, which the rows kernel
        skips."""
        scales = self._slot_scales.get(num_slots)
        if scales is None:
            scales = self._slot_scales[num_slots] = torch.ones(num_slots)
            scales[BASE_SLOT] = 0.0
        return scales

    def clear(self) -> None:
        self.add_lora = self.row_slots = self._grouping = self._segments = None


def linear_features(layer: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an nn.Linear or a transformers Conv1D (whose weight is stored (d_in, d_out))."""
    d0, d1 = layer.weight.shape
    return (d0, d1) if isinstance(layer, Conv1D) else (d1, d0)


SERVABLE_BASE_LAYERS = (nn.Linear, Conv1D)


class ServingLoraLinear(nn.Module):
    """Wraps a frozen nn.Linear / Conv1D; adds the batched low-rank updates of the resident adapters."""

    def __init__(self, base_layer: nn.Module, num_slots: int, batch: BatchAdapters) -> None:
        super().__init__()
        if not isinstance(base_layer, SERVABLE_BASE_LAYERS):
            raise TypeError(f"ServingLoraLinear wraps nn.Linear or Conv1D, not {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_features(base_layer)
        self.batch = batch
        weight = base_layer.weight
        # rank 0 until an adapter arrives: buffers, so they follow the model's device and are never trained. In
        # the base's dtype, but fp32 for a bf16 base on the CPU: its decoding passes then take the rows kernel,
        # which reads fp32 stacks and rounds each row's update into the output once (bf16 stacks took the
        # segmented path: docs/serving.md)
        dtype = torch.float32 if weight.dtype == torch.bfloat16 and weight.device.type == "cpu" else weight.dtype
        self.register_buffer("lora_A", weight.new_zeros(num_slots, 0, self.in_features, dtype=dtype),
                             persistent=False)
        self.register_buffer("lora_B", weight.new_zeros(num_slots, 0, self.out_features, dtype=dtype),
                             persistent=False)

    @property
    def max_rank(self) -> int:
        return self.lora_A.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer  # a dense layer on lorakit's matmul: a decoding pass's rows on the few-rows kernel
        out = linear_layer(base, x) if type(base) is nn.Linear else base(x)
        if self.batch.add_lora is None or self.max_rank == 0:
            return out
        return self.batch.add_lora(x, out, self.lora_A, self.lora_B, self.batch)

    # ---- slot management (the engine thread only, between forward passes) ------------------------------
    def grow_rank(self, rank: int) -> None:
        """Zero-pad every slot to rank `rank` (a no-op when the stacks are that wide already)."""
        if rank <= self.max_rank:
            return
        slots, old = self.lora_A.shape[0], self.max_rank
        lora_a = self.lora_A.new_zeros(slots, rank, self.in_features)
        lora_b = self.lora_B.new_zeros(slots, rank, self.out_features)
        lora_a[:, :old] = self.lora_A
        lora_b[:, :old] = self.lora_B
        self.lora_A, self.lora_B = lora_a, lora_b

    def write_slot(self, slot: int, lora_a: torch.Tensor | None, scaled_b: torch.Tensor | None) -> None:
        """Put one adapter into `slot`: lora_a (r, d_in) = A, scaled_b (d_out, r) = s * B; None clears the slot
        (the adapter does not target this layer)."""
        if lora_a is None:
            self.lora_A[slot].zero_()
            self.lora_B[slot].zero_()
            return
        rank = lora_a.shape[0]
        self.grow_rank(rank)
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.lora_A[slot, :rank] = lora_a.to(self.lora_A.dtype)
        self.lora_B[slot, :rank] = scaled_b.T.to(self.lora_B.dtype)


def wrap_linear(model: nn.Module, module_name: str, num_slots: int, batch: BatchAdapters) -> ServingLoraLinear:
    """Replace `module_name` in `model` by a ServingLoraLinear around it (or return the existing wrapper)."""
    module = model.get_submodule(module_name)
    if isinstance(module, ServingLoraLinear):
        return module
    wrapper = ServingLoraLinear(module, num_slots, batch)
    model.set_submodule(module_name, wrapper)
    return wrapper
