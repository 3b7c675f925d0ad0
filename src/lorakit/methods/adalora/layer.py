"""AdaLoRA layers (Zhang et al. 2023, https://arxiv.org/abs/2303.10512, Sec. 3.1): an SVD-shaped update

    h = W0 x + lora_alpha / (ranknum + 1e-5) * P diag(E) Q dropout(x)
    Q = lora_A (r, d_in), E = lora_E (r, 1), P = lora_B (d_out, r)

A "triplet" i is (column i of P, E_i, row i of Q); pruning one sets E_i = 0 (allocator.py). `ranknum` is the
initial rank init_r and stays so when a saved adapter is loaded at a smaller rank, so the scale is the trained
one. Attribute names (lora_A, lora_E, lora_B as ParameterDicts, ranknum) are PEFT's, so files match PEFT's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.adapter_layer import AdapterLayer, adapter_dtype
from lorakit.methods.adalora.config import AdaLoraConfig

RANKNUM_EPS = 1e-5  # as PEFT: ranknum + 1e-5 in the denominator


class AdaLoraLayer(AdapterLayer):
    """The SVD triplets of each adapter; subclasses say how Q meets the input (`q_columns`, `adapter_output`)."""

    adapter_param_names = ("lora_A", "lora_E", "lora_B")
    adapter_meta_names = ("lora_dropout", "ranknum", "r", "lora_alpha", "scaling")

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = in_features, out_features
        self.lora_A = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        # frozen, never saved (PEFT keeps it as a parameter without gradient, so parameter counts agree)
        self.ranknum = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}

    @property
    def q_columns(self) -> int:
        """Columns of Q (lora_A): d_in, or d_in * kh * kw for a convolution."""
        return self.in_features

    def add_adapter(self, name: str, config: AdaLoraConfig, module_name: str) -> None:
        """Rank init_r, or the number of kept triplets when config.rank_pattern names this module (a trained
        adapter being loaded)."""
        if self.has_adapter(name):
            raise ValueError(f"{module_name} already has an adapter named {name!r}")
        kept = config.kept_triplets(module_name)
        if kept is not None and len(kept) != config.init_r:
            raise ValueError(f"AdaLoraConfig.rank_pattern[{module_name + '.lora_E'!r}] has {len(kept)} entries; it "
                             f"needs one per initial triplet, init_r={config.init_r}")
        r = config.init_r if kept is None else sum(kept)
        self.r[name] = r
        self.lora_alpha[name] = config.lora_alpha
        self.scaling[name] = config.lora_alpha
        self.lora_dropout[name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        kwargs = dict(device=self.base_weight.device, dtype=adapter_dtype(self.base_weight))
        q, e, p = (torch.randn(r, self.q_columns, **kwargs), torch.randn(r, 1, **kwargs),
                   torch.randn(self.out_features, r, **kwargs))
        if config.init_lora_weights:  # E = 0: the update starts at zero; P, Q small (the paper's Sec. 3.1)
            nn.init.zeros_(e)
            nn.init.normal_(q, mean=0.0, std=0.02)
            nn.init.normal_(p, mean=0.0, std=0.02)
        self.lora_A[name], self.lora_E[name], self.lora_B[name] = nn.Parameter(q), nn.Parameter(e), nn.Parameter(p)
        # A layer loaded with every triplet pruned has ranknum 0, as in PEFT (it adds nothing either way).
        self.ranknum[name] = nn.Parameter(torch.tensor([float(config.init_r if r else 0)], device=kwargs["device"]),
                                          requires_grad=False)

    def update_matrix(self, name: str) -> torch.Tensor:
        """lora_alpha / (ranknum + 1e-5) * P diag(E) Q in fp32, shape (d_out, q_columns)."""
        q, e, p = self.lora_A[name].float(), self.lora_E[name].float(), self.lora_B[name].float()
        return self._scale(name, p @ (q * e)).float()

    def _scale(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """value * lora_alpha / (ranknum + 1e-5), in PEFT's order of operations."""
        return value * self.scaling[name] / (self.ranknum[name] + RANKNUM_EPS)


class SVDLinear(AdaLoraLayer):
    """AdaLoRA on nn.Linear, or on transformers' Conv1D (GPT-2), whose weight is stored transposed (d_in, d_out)."""

    def __init__(self, base_layer: nn.Linear | Conv1D) -> None:
        d0, d1 = base_layer.weight.shape
        fan_in_fan_out = isinstance(base_layer, Conv1D)
        super().__init__(base_layer, *((d0, d1) if fan_in_fan_out else (d1, d0)))
        self.fan_in_fan_out = fan_in_fan_out

    def delta_weight(self, name: str) -> torch.Tensor:
        delta = self.update_matrix(name)
        return (delta.T if self.fan_in_fan_out else delta).to(self.base_weight.dtype)

    def adapter_output(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        q, e, p = self.lora_A[name], self.lora_E[name], self.lora_B[name]
        x = self.lora_dropout[name](x.to(q.dtype))
        return self._scale(name, x @ (q * e).T @ p.T).to(base_out.dtype)


class SVDConv2d(AdaLoraLayer):
    """AdaLoRA on nn.Conv2d: Q is (r, d_in * kh * kw); the update P diag(E) Q, reshaped to the kernel's shape, is
    convolved with the input like the base kernel."""

    @classmethod
    def wrap_refusal(cls, base_layer: nn.Conv2d) -> str | None:
        if base_layer.groups == 1:
            return None
        return (f"with groups={base_layer.groups}: AdaLoRA on a grouped Conv2d is not supported; exclude this module "
                "(exclude_modules)")

    def __init__(self, base_layer: nn.Conv2d) -> None:
        super().__init__(base_layer, base_layer.in_channels, base_layer.out_channels)

    @property
    def q_columns(self) -> int:
        kh, kw = self.base_layer.kernel_size
        return self.in_features * kh * kw

    def delta_weight(self, name: str) -> torch.Tensor:
        return self.update_matrix(name).reshape(self.base_weight.shape).to(self.base_weight.dtype)

    def adapter_output(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        q, e, p = self.lora_A[name], self.lora_E[name], self.lora_B[name]
        base = self.base_layer
        kernel = self._scale(name, p @ (q * e)).reshape(base.weight.shape)
        x = self.lora_dropout[name](x.to(q.dtype))
        return F.conv2d(x, kernel, stride=base.stride, padding=base.padding, dilation=base.dilation).to(base_out.dtype)
