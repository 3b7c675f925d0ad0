"""LoRA layers (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

    h = W0 x + s * B A dropout(x),   A: (r, d_in), B: (d_out, r), W0 frozen.

Each class wraps its base layer and keeps one (A, B) pair per adapter name, with PEFT's attribute names
(`lora_A`, `lora_B`, `lora_embedding_A`, `lora_embedding_B`) so parameter names and files match PEFT.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.adapter_layer import AdapterLayer, adapter_dtype
from lorakit.methods.lora.config import LoraConfig
from lorakit.methods.lora.init import INIT_FNS, embedding_init, init_key


class LoraLayer(AdapterLayer):
    """Rank, alpha, scaling and dropout per adapter; subclasses own the A/B tensors."""

    adapter_meta_names = ("lora_dropout", "r", "lora_alpha", "scaling")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}

    def add_adapter(self, name: str, config: LoraConfig, module_name: str) -> None:
        if self.has_adapter(name):
            raise ValueError(f"{module_name} already has an adapter named {name!r}")
        self.r[name] = config.rank_for(module_name)
        self.lora_alpha[name] = config.alpha_for(module_name)
        self.scaling[name] = config.scaling_for(module_name)
        dropout = config.lora_dropout
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._create_tensors(name, self.r[name])
        self._initialise(name, init_key(config.init_lora_weights))

    def _create_tensors(self, name: str, r: int) -> None:
        raise NotImplementedError

    def _initialise(self, name: str, key: str) -> None:
        raise NotImplementedError


class LoraLinear(LoraLayer):
    """LoRA on nn.Linear, or on transformers' Conv1D (GPT-2), whose weight is stored transposed (d_in, d_out)."""

    adapter_param_names = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Linear | Conv1D) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        d0, d1 = base_layer.weight.shape
        self.in_features, self.out_features = (d0, d1) if self.fan_in_fan_out else (d1, d0)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def _create_tensors(self, name: str, r: int) -> None:
        kwargs = dict(bias=False, device=self.base_weight.device, dtype=adapter_dtype(self.base_weight))
        self.lora_A[name] = nn.Linear(self.in_features, r, **kwargs)
        self.lora_B[name] = nn.Linear(r, self.out_features, **kwargs)

    def _initialise(self, name: str, key: str) -> None:
        INIT_FNS[key](self.lora_A[name].weight.data, self.lora_B[name].weight.data, self.r[name])

    def delta_weight(self, name: str) -> torch.Tensor:
        """s * B @ A, shape (d_out, d_in); transposed for Conv1D."""
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        delta = (b.float() @ a.float()) * self.scaling[name]
        if self.fan_in_fan_out:
            delta = delta.T
        return delta.to(self.base_weight.dtype)

    def adapter_output(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        x = x.to(lora_a.weight.dtype)
        return (lora_b(lora_a(self.lora_dropout[name](x))) * self.scaling[name]).to(base_out.dtype)


class LoraEmbedding(LoraLayer):
    """LoRA on nn.Embedding: h = E[ids] + s * (A^T[ids]) B^T, A: (r, num_embeddings), B: (dim, r).

    Dropout is not applied: the input is token ids.
    """

    adapter_param_names = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def _create_tensors(self, name: str, r: int) -> None:
        num, dim = self.base_weight.shape
        kwargs = dict(device=self.base_weight.device, dtype=adapter_dtype(self.base_weight))
        self.lora_embedding_A[name] = nn.Parameter(torch.empty(r, num, **kwargs))
        self.lora_embedding_B[name] = nn.Parameter(torch.empty(dim, r, **kwargs))

    def _initialise(self, name: str, key: str) -> None:
        embedding_init(self.lora_embedding_A[name].data, self.lora_embedding_B[name].data, self.r[name], key)

    def delta_weight(self, name: str) -> torch.Tensor:
        """s * (B @ A)^T, shape (num_embeddings, dim)."""
        a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
        return ((b.float() @ a.float()).T * self.scaling[name]).to(self.base_weight.dtype)

    def adapter_output(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        after_a = F.embedding(x, self.lora_embedding_A[name].T, base.padding_idx, base.max_norm,
                              base.norm_type, base.scale_grad_by_freq, base.sparse)
        return ((after_a @ self.lora_embedding_B[name].T) * self.scaling[name]).to(base_out.dtype)


class LoraConv2d(LoraLayer):
    """LoRA on nn.Conv2d: A is a conv with the base's kernel, stride, padding (r output channels),
    B a 1x1 conv from r to the output channels."""

    adapter_param_names = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Conv2d) -> None:
        if base_layer.groups != 1:
            raise TypeError(f"LoRA on a grouped Conv2d (groups={base_layer.groups}) is not supported; "
                            "exclude this module (exclude_modules)")
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def _create_tensors(self, name: str, r: int) -> None:
        base = self.base_layer
        kwargs = dict(bias=False, device=self.base_weight.device, dtype=adapter_dtype(self.base_weight))
        self.lora_A[name] = nn.Conv2d(base.in_channels, r, base.kernel_size, base.stride, base.padding,
                                      base.dilation, padding_mode=base.padding_mode, **kwargs)
        self.lora_B[name] = nn.Conv2d(r, base.out_channels, (1, 1), (1, 1), **kwargs)

    def _initialise(self, name: str, key: str) -> None:
        INIT_FNS[key](self.lora_A[name].weight.data, self.lora_B[name].weight.data, self.r[name])

    def delta_weight(self, name: str) -> torch.Tensor:
        """s * B A as a conv kernel (d_out, d_in, kh, kw): B (d_out, r, 1, 1) composed with A (r, d_in, kh, kw)."""
        a, b = self.lora_A[name].weight.float(), self.lora_B[name].weight.float()
        delta = torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a)
        return (delta * self.scaling[name]).to(self.base_weight.dtype)

    def adapter_output(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        x = x.to(lora_a.weight.dtype)
        return (lora_b(lora_a(self.lora_dropout[name](x))) * self.scaling[name]).to(base_out.dtype)
