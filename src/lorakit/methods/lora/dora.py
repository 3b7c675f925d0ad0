"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, https://arxiv.org/abs/2402.09353).

    W' = m * (W0 + s B A) / ||W0 + s B A||        (norm per output row, i.e. over the input dimension)

m (`lora_magnitude_vector`, one value per output row, PEFT's name and shape) starts at ||W0 + s B0 A0|| =
||W0|| for the standard init, so the adapter starts at the identity; m, A and B are trained. As the paper
suggests (Sec. 4.3), the norm is a constant in the backward (no gradient flows through it), which saves the
memory of a (d_out, d_in) graph. For an input x (rows of the batch) the layer outputs

    W' x + bias = scale * (W0 x + s B A x) + bias,      scale = m / ||W0 + s B A||

computed from the base layer's output, so the adapter adds `scale * (base + lora) - base` to it (base without
the bias). During training with lora_dropout the base term is recomputed on the dropped input, as PEFT does.
One running DoRA adapter on a linear layer without active dropout computes `scale * (W0 x + s B A x) + bias`
directly on the fused LoRA function instead (fused.py; LoraLinear._fused_dora_forward, layer.py), the scaling one
pass each way (ops/column_scale.py).

The row norm without B A: per row i,

    ||W_i + s (B A)_i||^2 = ||W_i||^2 + 2 s <B_i, (W A^T)_i> + s^2 B_i (A A^T) B_i^T

needs W A^T (d_out x r) and A A^T (r x r): r-sized products, and no (d_out, d_in) temporary as the
straightforward `W + s * (B @ A)` would allocate (PEFT's way). tests/unit/test_lora_variants.py checks the two
agree; docs/lora-variants.md gives the measured step times.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn


@torch.no_grad()
def weight_row_norms_sq(weight: torch.Tensor) -> torch.Tensor:
    """||W_i||^2 per row of a (d_out, d_in) weight, in fp32 (or fp64): row_norms' first term."""
    acc = torch.promote_types(weight.dtype, torch.float32)
    return torch.linalg.vector_norm(weight, dim=1, dtype=acc).square()


@torch.no_grad()
def row_norms(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
              weight_sq: torch.Tensor | None = None) -> torch.Tensor:
    """||W + s B A|| per row, (d_out,) in fp32 (or fp64), without forming B A. weight: (d_out, d_in),
    a: (r, d_in), b: (d_out, r); weight_sq: weight_row_norms_sq(weight) when the caller has it. A half-precision W
    is read as it is (no fp32 copy of it is made)."""
    acc = torch.promote_types(weight.dtype, torch.float32)
    a32, b32 = a.to(acc), b.to(acc)
    if weight_sq is None:
        weight_sq = weight_row_norms_sq(weight)
    wa = (weight @ a.to(weight.dtype).T).to(acc)  # (d_out, r): the one product that reads W
    # 2 s <B_i, (W A^T)_i> + s^2 B_i (A A^T) B_i^T = 2 s <B_i, (W A^T + (s / 2) B A A^T)_i>: six small operations
    # where the terms one by one take twelve (each ~4 us, for each DoRA layer of each step)
    inner = torch.linalg.vecdot(b32, torch.addmm(wa, b32, a32 @ a32.T, alpha=scaling / 2))
    return torch.add(weight_sq, inner, alpha=2 * scaling).clamp_min_(0).sqrt_()


def dense_row_norms(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The same as row_norms, straightforwardly: ||W + s (B @ A)|| per row (as PEFT computes it)."""
    return torch.linalg.norm(weight + scaling * (b @ a), dim=1)


class DoraVariant:
    """DoRA for one adapter of one LoRA layer. The layer provides the matrix view (layer.py): `to_matrix`,
    `from_matrix`, `matrix_factors`, `norm_factors` (the factors the norm uses), `magnitude_shape`, `lora_input`,
    `lora_output`."""

    label = "DoRA"

    def __init__(self) -> None:
        self.merge_factor: torch.Tensor | None = None  # m / ||W + s B A|| at merge time, for an exact unmerge
        # ||W0_i||^2 of the frozen base weight, which every step's norm needs and which changes only when W0 does:
        # (weak reference to W0, the data pointer, version, dtype and shape it was computed for, the norms)
        self._base_norms_sq: tuple | None = None

    @classmethod
    def create(cls, layer, name: str) -> "DoraVariant":
        """Add `lora_magnitude_vector[name]` = ||W0 + s B A|| (computed as PEFT does, for identical files)."""
        with torch.no_grad():
            a, b = layer.norm_factors(name)
            weight = layer.to_matrix(layer.dense_base_weight())
            norm = dense_row_norms(weight, a, b, layer.scaling[name])
        layer.lora_magnitude_vector[name] = nn.Parameter(norm.to(a.dtype).reshape(layer.magnitude_shape()))
        return cls()

    def reset(self, layer, name: str) -> None:
        """Set `lora_magnitude_vector[name]` in place to ||W + s B A|| for the current W, A, B."""
        with torch.no_grad():
            a, b = layer.norm_factors(name)
            norm = dense_row_norms(layer.to_matrix(layer.dense_base_weight()), a, b, layer.scaling[name])
            magnitude = layer.lora_magnitude_vector[name]
            magnitude.copy_(norm.to(magnitude.dtype).reshape(magnitude.shape))

    def scale(self, layer, name: str) -> torch.Tensor:
        """m / ||W + s B A||, shaped like m (broadcasts over the layer's output); the norm carries no gradient."""
        magnitude = layer.lora_magnitude_vector[name]
        return magnitude / self.norm(layer, name).view(magnitude.shape)

    def norm(self, layer, name: str) -> torch.Tensor:
        """||W + s B A|| per output row, (d_out,) in fp32 (or fp64), without gradient."""
        base = layer.dense_base_weight()
        weight = layer.to_matrix(base)
        return row_norms(weight, *layer.norm_factors(name), layer.scaling[name], self._weight_norms_sq(base, weight))

    def _weight_norms_sq(self, base: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """weight_row_norms_sq(weight), computed once for a frozen base weight and reused while it is the same tensor
        with the same storage and version (the version counts every in-place write to the parameter: a merge
        through write_base_weight, load_state_dict, an optimizer; not a write through `.data`, which bypasses it).
        A weight made anew on each call (a quantized layer's dequantized copy) is never reused. Saves a pass over
        every frozen weight per step: DoRA's step 3.4% faster (docs/performance.md, optimisation 43)."""
        if base.requires_grad or base.is_inference():  # trained, or without a version counter: computed each time
            return weight_row_norms_sq(weight)
        key = (base.data_ptr(), base._version, base.dtype, base.shape)
        cached = self._base_norms_sq
        if cached is not None and cached[0]() is base and cached[1] == key:
            return cached[2]
        norms_sq = weight_row_norms_sq(weight)
        self._base_norms_sq = (weakref.ref(base), key, norms_sq)
        return norms_sq

    def adapter_output(self, layer, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        dropped = layer.lora_input(name, x)
        base = layer.base_layer(dropped.to(base_out.dtype)) if layer.dropout_acts(name) else base_out
        scale = self.scale(layer, name)
        if layer.bias is not None:
            base = base - layer.bias.view(scale.shape)
        # scale * (base + lora) - base rather than (scale - 1) * base + scale * lora: the same value, and the
        # backward keeps one output-sized tensor (base + lora) instead of two
        return (scale * (base + layer.lora_output(name, dropped)) - base).to(base_out.dtype)

    def merge_weight(self, layer, name: str, weight: torch.Tensor) -> torch.Tensor:
        """W' = m / ||W + s B A|| * (W + s B A), rows of the matrix view; keeps the factor for unmerge_weight."""
        combined = layer.to_matrix(weight).float() + self._delta(layer, name)
        factor = layer.lora_magnitude_vector[name].detach().float().reshape(-1) / torch.linalg.norm(combined, dim=1)
        self.merge_factor = factor
        return layer.from_matrix(factor[:, None] * combined).to(weight.dtype)

    def unmerge_weight(self, layer, name: str, weight: torch.Tensor) -> torch.Tensor:
        """W = W' / factor - s B A, with the factor of the merge (W' alone does not determine the old norm)."""
        if self.merge_factor is None:
            raise RuntimeError(f"DoRA adapter {name!r} was not merged by this layer; nothing to unmerge")
        restored = layer.to_matrix(weight).float() / self.merge_factor[:, None] - self._delta(layer, name)
        self.merge_factor = None
        return layer.from_matrix(restored).to(weight.dtype)

    @staticmethod
    def _delta(layer, name: str) -> torch.Tensor:
        a, b = layer.matrix_factors(name)
        return (b.float() @ a.float()) * layer.scaling[name]
