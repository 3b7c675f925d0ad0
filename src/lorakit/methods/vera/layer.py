"""VeRA layers (Kopiczko et al. 2023, https://arxiv.org/abs/2310.11454).

    h = W0 x + b * (B[:d_out] (d * (A[:, :d_in] dropout(x))))  =  W0 x + diag(b) B diag(d) A x

A (r, max d_in) and B (max d_out, r) are the adapter's frozen projections, shared by all its layers and kept on
the host (`base_model.vera_A` / `vera_B`, tuner.py); each layer slices the block it needs. Per layer and
adapter, only `vera_lambda_d` (r) and `vera_lambda_b` (d_out) train: PEFT's names, so files match PEFT's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.adapter_layer import AdapterLayer, adapter_dtype
from lorakit.methods.vera.config import VeraConfig
from lorakit.methods.vera.projections import ProjectionBuffers


def in_out_features(module: nn.Linear | Conv1D) -> tuple[int, int]:
    """(d_in, d_out) of a Linear, or of a Conv1D, whose weight is stored (d_in, d_out)."""
    d0, d1 = module.weight.shape
    return (d0, d1) if isinstance(module, Conv1D) else (d1, d0)


class VeraLinear(AdapterLayer):
    """VeRA on nn.Linear, or on transformers' Conv1D (GPT-2), whose weight is stored transposed (d_in, d_out)."""

    adapter_param_names = ("vera_lambda_b", "vera_lambda_d")
    adapter_meta_names = ("vera_dropout", "r")

    def __init__(self, base_layer: nn.Linear | Conv1D) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.in_features, self.out_features = in_out_features(base_layer)
        self.vera_lambda_b = nn.ParameterDict()
        self.vera_lambda_d = nn.ParameterDict()
        self.vera_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        # (vera_A, vera_B) of the host, read at every use: a plain tuple, so the host's buffers are not registered
        # again under every layer (they would be saved once per layer and moved twice)
        self.projections: tuple[ProjectionBuffers, ProjectionBuffers] | None = None

    def add_adapter(self, name: str, config: VeraConfig, module_name: str) -> None:
        if self.has_adapter(name):
            raise ValueError(f"{module_name} already has an adapter named {name!r}")
        self.r[name] = config.r
        self.vera_dropout[name] = nn.Dropout(config.vera_dropout) if config.vera_dropout > 0 else nn.Identity()
        kwargs = dict(device=self.base_weight.device, dtype=adapter_dtype(self.base_weight))
        if config.init_weights:  # identity start: b = 0, d = d_initial
            lambda_b = torch.zeros(self.out_features, **kwargs)
            lambda_d = torch.full((config.r,), float(config.d_initial), **kwargs)
        else:  # PEFT's init_weights=False: b = 1, d ~ N(0, 1)
            lambda_b = torch.ones(self.out_features, **kwargs)
            lambda_d = torch.randn(config.r, **kwargs)
        self.vera_lambda_b[name] = nn.Parameter(lambda_b)
        self.vera_lambda_d[name] = nn.Parameter(lambda_d)

    def use_projections(self, vera_a: ProjectionBuffers, vera_b: ProjectionBuffers) -> None:
        self.projections = (vera_a, vera_b)

    def _sliced_projections(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A[:, :d_in] (r, d_in) and B[:d_out] (d_out, r) of adapter `name`."""
        vera_a, vera_b = self.projections
        return vera_a[name][:, :self.in_features], vera_b[name][:self.out_features, :]

    def delta_weight(self, name: str) -> torch.Tensor:
        """(b B)(d A), shape (d_out, d_in); transposed for Conv1D."""
        sliced_a, sliced_b = self._sliced_projections(name)
        lambda_b, lambda_d = self.vera_lambda_b[name].float(), self.vera_lambda_d[name].float()
        delta = (lambda_b[:, None] * sliced_b.float()) @ (lambda_d[:, None] * sliced_a.float())
        if self.fan_in_fan_out:
            delta = delta.T
        return delta.to(self.base_weight.dtype)

    def adapter_output(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        sliced_a, sliced_b = self._sliced_projections(name)
        lambda_b, lambda_d = self.vera_lambda_b[name], self.vera_lambda_d[name]
        x = self.vera_dropout[name](x.to(lambda_d.dtype))
        return (lambda_b * F.linear(lambda_d * F.linear(x, sliced_a.to(x.dtype)), sliced_b.to(x.dtype))).to(
            base_out.dtype)
