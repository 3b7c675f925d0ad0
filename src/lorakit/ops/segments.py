"""A mixed-adapter batch's rows grouped into one segment per adapter: Punica's SGMV in plain PyTorch.

Row i of a batch x (n, T, d_in) uses the adapter in slot k_i of stacks that hold every adapter once. Its update

    delta_i = s_k (x_i A_k^T) B_k^T        (k = k_i)

runs, for all rows at once, as one pair of batched matmuls over G segments, one per slot present (in ascending
slot order), each padded to the longest segment (m places; a short segment repeats its first row, whose result
nobody reads): each adapter's weights are read once per pass, and no weights are copied per row. Each row then
takes its result from its place. Punica (Chen et al. 2023, https://arxiv.org/abs/2310.18547) does the same in
one CUDA kernel without the padding.

Used by the server's decoding passes (serve/lora_ops.py) and by the library's mixed batches without autograd
where a decoded token does not take lorakit's CPU kernel (methods/lora/mixed.py: bf16 adapters, CUDA,
LORAKIT_MATMUL=aten; also fp16 rows on fp32 adapters).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Segments:
    """The layout of one batch: `slots` (G,) each segment's slot, ascending; `rows` (G*m,) the batch row read
    into each place; `places` (n,) the place holding each row's result; `size` m; `slot_list` the slots as
    Python ints."""

    slots: torch.Tensor
    rows: torch.Tensor
    places: torch.Tensor
    size: int
    slot_list: tuple[int, ...]

    def select(self, stack: torch.Tensor) -> torch.Tensor:
        """stack (S, ...) -> (G, ...): the segments' weights, a view when their slots are consecutive."""
        first, last = self.slot_list[0], self.slot_list[-1]
        if last - first + 1 == len(self.slot_list):
            return stack[first:last + 1]
        return stack.index_select(0, self.slots)


def segment_rows(row_slots: list[int], device: torch.device) -> Segments:
    """Segments for a batch whose row i uses slot row_slots[i] (at least one row)."""
    members: dict[int, list[int]] = {}
    for row, slot in enumerate(row_slots):
        members.setdefault(slot, []).append(row)
    slot_list = tuple(sorted(members))
    size = max(len(rows) for rows in members.values())
    places, padded = [0] * len(row_slots), []
    for g, slot in enumerate(slot_list):
        rows = members[slot]
        for j, row in enumerate(rows):
            places[row] = g * size + j
        padded += rows + [rows[0]] * (size - len(rows))
    slots, rows, place_index = (torch.tensor(values, dtype=torch.long, device=device)
                                for values in (slot_list, padded, places))
    return Segments(slots, rows, place_index, size, slot_list)


def segmented_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, segments: Segments,
                    scales: torch.Tensor | None = None) -> torch.Tensor:
    """Each row's update (n, T, d_out): x (n, T, d_in); a (G, d_in, r) and b (G, r, d_out) the segments' A^T
    and B^T (Segments.select); scales (G,) the segments' scalings, or None when b has them folded in. The scaling
    multiplies the rank-wide x A^T."""
    groups, tokens = a.shape[0], x.shape[1]
    segment_x = x.index_select(0, segments.rows).view(groups, segments.size * tokens, x.shape[2])
    u = torch.bmm(segment_x, a)
    if scales is not None:
        u.mul_(scales.view(-1, 1, 1))
    return torch.bmm(u, b).view(groups * segments.size, tokens, -1).index_select(0, segments.places)
