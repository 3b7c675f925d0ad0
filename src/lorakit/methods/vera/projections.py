"""VeRA's shared random projections (Kopiczko et al. 2023, https://arxiv.org/abs/2310.11454, Sec. 3).

One pair per adapter, shared by all its layers: A (r, max d_in) and B (max d_out, r) over the targeted layers;
a layer uses the top-left block it needs, A[:, :d_in] and B[:d_out, :]. They are drawn exactly as PEFT draws
them, so both libraries regenerate the same matrices from `projection_prng_key`:

    generator = torch.Generator("cpu").manual_seed(projection_prng_key)
    A ~ U(-bound(max d_in), bound(max d_in))   then   B ~ U(-bound(r), bound(r))   from that one generator,
    bound(fan_in) = sqrt(3) * sqrt(2) / sqrt(fan_in)   (Kaiming-uniform with gain sqrt(2))
"""

from __future__ import annotations

import math

import torch
from torch import nn


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform (gain sqrt(2), fan_in = shape[1]) from `generator`. The bound is computed as
    sqrt(3) * (gain / sqrt(fan_in)), in that order, so that it is the same float as PEFT's."""
    std = math.sqrt(2) / math.sqrt(shape[1])
    bound = math.sqrt(3.0) * std
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def generate_projections(seed: int, r: int, in_features: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in_features), B (out_features, r)), float32 on the CPU, A drawn first."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    vera_a = kaiming_uniform((r, in_features), generator)
    vera_b = kaiming_uniform((out_features, r), generator)
    return vera_a, vera_b


class ProjectionBuffers(nn.Module):
    """Adapter name -> frozen tensor, held as buffers (PEFT's BufferDict), so the host's `vera_A.<adapter>` moves
    with the model (`.to(device)`) and never trains. `persistent=False` keeps it out of `state_dict()`."""

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._buffers[name]

    def set(self, name: str, tensor: torch.Tensor, persistent: bool) -> None:
        self.register_buffer(name, tensor, persistent=persistent)

    def __delitem__(self, name: str) -> None:
        del self._buffers[name]
        self._non_persistent_buffers_set.discard(name)

    def __contains__(self, name: str) -> bool:
        return name in self._buffers

    def __len__(self) -> int:
        return len(self._buffers)

    def keys(self) -> list[str]:
        return list(self._buffers)
