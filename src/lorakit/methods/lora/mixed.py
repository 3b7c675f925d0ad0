"""Mixed-adapter batches of LoRA linear layers as batched matmuls over stacked adapter weights.

    y_i = base(x_i) + s_i (x_i A_i^T) B_i^T        row i of the batch uses adapter i (A_i: (r, d_in), B_i: (d_out, r))

The general path (AdapterLayer._mixed_batch_forward) runs each adapter on its rows: per adapter and layer a
gather of the rows, two matmuls, a scaling and a scatter-add of the full output, so a batch of 8 rows with 8
adapters costs ~50 small operators per layer, which dominate a decoding step (every generated token runs them).
Here the adapters' A and B are stacked once per mixed batch (zero-padded to the largest rank; rows without an
adapter, "__base__", use slot 0, all zeros), and every row's update is a fixed handful of operators whatever
the number of adapters, with the scaling on the rank-wide s_i x_i A_i^T (r columns, not the full-width output).
The approach of S-LoRA / Punica, in plain PyTorch.

Zero padding adds exact zeros, so the result equals the general path to fp32 rounding (the matmuls sum over the
padded rank). Used when every adapter routed through the layer is plain LoRA without active dropout, all in
one dtype; anything else (DoRA, dropout in training, mixed dtypes) takes the general path.
Without autograd (generation), nothing is kept per row beyond one layer's call:
- a decoded token's rows on the CPU (at most 16 tokens per sequence, any number of sequences; fp32, or bf16 on
  fp32 adapters) take lorakit's kernel (lorakit.ops.lora_rows: one call reading each sequence's adapter from the
  stacks; the update added into the base output in fp32; equal to fp32 rounding, bf16 outputs rounded once);
- a prompt's rows (more than 16 tokens each) take `add_gathered_`: each row's adapter gathered from the stacks
  (a transient copy per row and layer, over the row's many tokens), one bmm and one baddbmm_ into the base output,
  in the rows' dtype (fp32 adapters on a bf16 base compute in bf16, as a single adapter does);
- anything else (a decoded token with bf16 adapters, on CUDA, under LORAKIT_MATMUL=aten) groups the rows into one
  segment per adapter (lorakit.ops.segments, Punica's SGMV): one pair of batched matmuls that reads each adapter
  once, with no copy per row;
- the stacks and the segments are kept for the duration of the mixed batch (one `generate()` call decodes
  every token with them).
With autograd they are rebuilt on every forward, each row's A and B gathered from the stacks (`bmm`, then
`baddbmm`, which adds the product with B_i^T in the matmul's output stage), so that gradients reach each
adapter's own tensors.
"""

from __future__ import annotations

import torch

from lorakit.ops import lora_rows
from lorakit.ops.segments import segment_rows, segmented_delta


def plain_factors(layer, names: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
    """{adapter: (A, B)} for the adapters named per row that this layer holds, or None when the general path must
    run: none held, a variant (DoRA, ...) or active dropout, or factors of more than one dtype. `layer` is a
    LoraLinear."""
    held = sorted({n for n in names if n in layer.lora_A})
    if not held or any(n in layer.lora_variant or layer.dropout_acts(n) for n in held):
        return None
    factors = {n: layer.matrix_factors(n) for n in held}
    return factors if len({t.dtype for pair in factors.values() for t in pair}) == 1 else None


def stacked_weights(layer, names: list[str], factors: dict, device: torch.device):
    """(A per slot (S, r_max, d_in), B^T per slot (S, r_max, d_out), s per slot (S,), the slot of each row (rows,)):
    the adapters named per row stacked once, zero-padded to the largest rank, slot 0 zeros for rows without an
    adapter in this layer; `factors` from plain_factors. With autograd each slot is its adapter's tensor."""
    held = list(factors)
    dtype = next(iter(factors.values()))[0].dtype
    r_max = max(a.shape[0] for a, _ in factors.values())
    d_out, d_in = layer.out_features, layer.in_features
    # one stack call each (with autograd, each slot is its adapter's tensor): a copy per layer, not one per slot
    a_stack = torch.stack([torch.zeros(r_max, d_in, dtype=dtype, device=device)]
                          + [_pad_rows(factors[n][0], r_max) for n in held])
    b_stack = torch.stack([torch.zeros(r_max, d_out, dtype=dtype, device=device)]
                          + [_pad_cols(factors[n][1], r_max).T for n in held])  # B^T: rows of r_max x d_out
    scales = torch.tensor([0.0] + [layer.scaling[n] for n in held], dtype=dtype, device=device)
    slot_of = {name: slot for slot, name in enumerate(held, start=1)}
    slots = torch.tensor([slot_of.get(n, 0) for n in names], device=device)
    return a_stack, b_stack, scales, slots


def add_gathered_(x: torch.Tensor, base_out: torch.Tensor, a_stack: torch.Tensor, bt_stack: torch.Tensor,
                  scales: torch.Tensor, slots: torch.Tensor) -> bool:
    """Without autograd, for rows of many tokens (a prompt), x (rows, tokens, d_in): each row's adapter gathered
    from the stacks (its r-wide A and B copied once per row and layer, for all of the row's tokens), s_i x_i A_i^T
    for every row in one bmm, and its product with B_i^T added into base_out in place, in baddbmm_'s output stage:
    two matmul calls a layer whatever the adapters. In the rows' dtype, as a single adapter computes (fused.py): fp32
    adapters on a bf16 base are cast to bf16 after the gather, never the full-width rows and outputs to fp32. False
    where it does not apply (base_out of another dtype or not contiguous; fp16 rows on fp32 adapters, which compute
    in fp32 for range): the segments run instead."""
    dtype = x.dtype
    if (base_out.dtype != dtype or not base_out.is_contiguous()
            or (dtype == torch.float16 and a_stack.dtype != dtype)):
        return False
    a_rows = a_stack.index_select(0, slots).to(dtype)
    bt_rows = bt_stack.index_select(0, slots).to(dtype)
    u = torch.bmm(x, a_rows.transpose(1, 2))
    u.mul_(scales.index_select(0, slots).view(-1, 1, 1))  # rank-wide; multiplied in the scales' fp32, rounded once
    base_out.view(x.shape[0], -1, base_out.shape[-1]).baddbmm_(u, bt_rows)
    return True


def _pad_rows(a: torch.Tensor, r_max: int) -> torch.Tensor:
    return a if a.shape[0] == r_max else torch.cat([a, a.new_zeros(r_max - a.shape[0], a.shape[1])])


def _pad_cols(b: torch.Tensor, r_max: int) -> torch.Tensor:
    return b if b.shape[1] == r_max else torch.cat([b, b.new_zeros(b.shape[0], r_max - b.shape[1])], dim=1)


def mixed_lora_forward(layer, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor | None:
    """base_out plus each row's own adapter update, or None when the general path must run."""
    if not x.is_floating_point() or x.dim() < 2:
        return None
    routing, batch = layer.routing, x.shape[0]
    names = routing.row_names(batch)
    grad = torch.is_grad_enabled()
    key = (id(layer), batch, x.device)
    cached = None if grad else routing.layer_state.get(key)
    if cached is None:
        factors = plain_factors(layer, names)
        if factors is None:
            return None
        cached = stacked_weights(layer, names, factors, x.device)
        if not grad:
            routing.layer_state[key] = cached
    a_stack, bt_stack, scales, slots = cached
    rows_x = x.reshape(batch, -1, x.shape[-1])             # (rows, tokens, d_in)
    rows_shape = (batch, -1, base_out.shape[-1])
    if not grad and lora_rows.gathered_kernel_runs(rows_x, base_out, a_stack):  # decoding, fp32 or bf16 rows
        lora_rows.lora_rows_gathered_(base_out, rows_x, a_stack, bt_stack, scales, slots)  # one call, in place
        return base_out
    if not grad and rows_x.shape[1] > lora_rows.MAX_ROWS and add_gathered_(
            rows_x, base_out, a_stack, bt_stack, scales, slots):  # a prompt's rows
        return base_out
    rows_x = rows_x.to(a_stack.dtype)
    if not grad:
        segments = routing.layer_state.get((*key, "segments"))
        if segments is None:  # once per mixed batch, like the stacks
            segments = routing.layer_state[(*key, "segments")] = segment_rows(slots.tolist(), x.device)
        delta = segmented_delta(rows_x, segments.select(a_stack).transpose(1, 2), segments.select(bt_stack),
                                segments, segments.select(scales))
        if base_out.dtype == delta.dtype and base_out.is_contiguous():
            base_out.view(rows_shape).add_(delta)  # into the fresh base output
            return base_out
        return base_out + delta.reshape(base_out.shape).to(base_out.dtype)
    a_rows, bt_rows, s_rows = a_stack[slots], bt_stack[slots], scales[slots]  # each row's own, differentiable
    u = torch.bmm(rows_x, a_rows.transpose(1, 2)) * s_rows.view(-1, 1, 1)  # s_i x_i A_i^T: rank-wide
    if base_out.dtype != u.dtype:  # e.g. bf16 base weights, fp32 adapters: the update in the adapters' dtype
        return base_out + torch.bmm(u, bt_rows).reshape(base_out.shape).to(base_out.dtype)
    return torch.baddbmm(base_out.reshape(rows_shape), u, bt_rows).view(base_out.shape)
