"""The serving LoRA layer: one frozen base matmul for the whole batch, a low-rank update per row's adapter.

S-LoRA (Sheng et al. 2023, https://arxiv.org/abs/2311.03285) and Punica (Chen et al. 2023,
https://arxiv.org/abs/2310.18547). Every targeted linear layer of the base model is replaced by a
`ServingLoraLinear` that keeps the adapters resident in compute memory stacked along a slot axis:

    lora_A: (S, d_in, r_max)     slot i holds A_i^T, zero-padded from rank r_i to r_max
    lora_B: (S, r_max, d_out)    slot i holds (s_i B_i)^T: the scaling s_i = alpha/r (or alpha/sqrt(r),
                                 rsLoRA, per module with rank/alpha patterns) is folded in once, at load

Slot 0 is all zeros: the base model. For a batch x: (n, T, d_in) whose row b uses adapter slot k_b,

    h_b = W0 x_b + x_b A_{k_b}^T (s B_{k_b})^T

Zero padding makes adapters of different ranks compute side by side: the padded columns of A and rows of
B contribute exactly 0. Nothing is ever merged into W0, so a batch may mix any resident adapters.

Two kernels compute the low-rank part (`LORA_KERNELS`): "gathered" copies each row's (A, B) out of the
stacks and runs two batched matmuls, a constant number of ops whatever the number of adapters in the
batch; "segmented" groups the rows by adapter and runs one matmul pair per adapter present (Punica's
SGMV idea without a custom kernel). On CPU the op count dominates at serving batch sizes, so "gathered"
is the default; `lorakit bench serve --kernel` measures both.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

BASE_SLOT = 0  # the all-zero slot: rows that use the base model alone


class BatchAdapters:
    """Which adapter slot each row of the current forward pass uses; shared by every serving layer.

    The engine sets `row_slots` (LongTensor (n,)) before a forward and clears it after; None (or a batch
    of base rows only) skips the low-rank part entirely."""

    def __init__(self) -> None:
        self.row_slots: torch.Tensor | None = None
        self.groups: list[tuple[int, torch.Tensor]] = []  # (slot, row indices) for the segmented kernel

    def set(self, row_slots: list[int], device: torch.device) -> None:
        if all(slot == BASE_SLOT for slot in row_slots):
            self.clear()
            return
        self.row_slots = torch.tensor(row_slots, dtype=torch.long, device=device)
        rows: dict[int, list[int]] = {}
        for row, slot in enumerate(row_slots):
            if slot != BASE_SLOT:
                rows.setdefault(slot, []).append(row)
        self.groups = [(slot, torch.tensor(r, dtype=torch.long, device=device)) for slot, r in rows.items()]

    def clear(self) -> None:
        self.row_slots = None
        self.groups = []


def gathered_lora(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, batch: BatchAdapters) -> torch.Tensor:
    """x: (n, T, d_in) -> (n, T, d_out): each row's A and B gathered from the stacks, two bmm."""
    a = lora_a.index_select(0, batch.row_slots)  # (n, d_in, r)
    b = lora_b.index_select(0, batch.row_slots)  # (n, r, d_out)
    return torch.bmm(torch.bmm(x, a), b)


def segmented_lora(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, batch: BatchAdapters) -> torch.Tensor:
    """x: (n, T, d_in) -> (n, T, d_out): rows grouped by adapter, one matmul pair per adapter in the batch."""
    out = x.new_zeros(*x.shape[:-1], lora_b.shape[-1])
    for slot, rows in batch.groups:
        out.index_copy_(0, rows, (x.index_select(0, rows) @ lora_a[slot]) @ lora_b[slot])
    return out


LORA_KERNELS = {"gathered": gathered_lora, "segmented": segmented_lora}


def linear_features(layer: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an nn.Linear or a transformers Conv1D (whose weight is stored (d_in, d_out))."""
    d0, d1 = layer.weight.shape
    return (d0, d1) if isinstance(layer, Conv1D) else (d1, d0)


SERVABLE_BASE_LAYERS = (nn.Linear, Conv1D)


class ServingLoraLinear(nn.Module):
    """Wraps a frozen nn.Linear / Conv1D; adds the batched low-rank updates of the resident adapters."""

    def __init__(self, base_layer: nn.Module, num_slots: int, batch: BatchAdapters, kernel: str = "gathered") -> None:
        super().__init__()
        if not isinstance(base_layer, SERVABLE_BASE_LAYERS):
            raise TypeError(f"ServingLoraLinear wraps nn.Linear or Conv1D, not {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_features(base_layer)
        self.batch = batch
        self.kernel = LORA_KERNELS[kernel]
        weight = base_layer.weight
        # rank 0 until an adapter arrives: buffers, so they follow .to() with the model and are never trained
        self.register_buffer("lora_A", weight.new_zeros(num_slots, self.in_features, 0), persistent=False)
        self.register_buffer("lora_B", weight.new_zeros(num_slots, 0, self.out_features), persistent=False)

    @property
    def max_rank(self) -> int:
        return self.lora_A.shape[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.batch.row_slots is None or self.max_rank == 0:
            return out
        return out + self.kernel(x.to(self.lora_A.dtype), self.lora_A, self.lora_B, self.batch).to(out.dtype)

    # ---- slot management (the engine thread only, between forward passes) ------------------------------
    def grow_rank(self, rank: int) -> None:
        """Zero-pad every slot to rank `rank` (a no-op when the stacks are that wide already)."""
        if rank <= self.max_rank:
            return
        slots, old = self.lora_A.shape[0], self.max_rank
        lora_a = self.lora_A.new_zeros(slots, self.in_features, rank)
        lora_b = self.lora_B.new_zeros(slots, rank, self.out_features)
        lora_a[..., :old] = self.lora_A
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
        self.lora_A[slot, :, :rank] = lora_a.T.to(self.lora_A.dtype)
        self.lora_B[slot, :rank] = scaled_b.T.to(self.lora_B.dtype)


def wrap_linear(model: nn.Module, module_name: str, num_slots: int, batch: BatchAdapters,
                kernel: str) -> ServingLoraLinear:
    """Replace `module_name` in `model` by a ServingLoraLinear around it (or return the existing wrapper)."""
    module = model.get_submodule(module_name)
    if isinstance(module, ServingLoraLinear):
        return module
    wrapper = ServingLoraLinear(module, num_slots, batch, kernel)
    model.set_submodule(module_name, wrapper)
    return wrapper
