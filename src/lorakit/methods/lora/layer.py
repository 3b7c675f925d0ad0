"""LoRA layers (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

    h = W0 x + s * B A dropout(x),   A: (r, d_in), B: (d_out, r), W0 frozen.

Each class wraps its base layer and keeps one (A, B) pair per adapter name, with PEFT's attribute names
(`lora_A`, `lora_B`, `lora_embedding_A`, `lora_embedding_B`, `lora_magnitude_vector`) so parameter names and
files match PEFT.

Every layer type also offers a "matrix view" of itself, so that initialisations (init.py), variants (dora.py)
and adapter arithmetic (arithmetic.py) are written once for all types: `to_matrix(W)` gives the base weight
as a (d_out, d_in) matrix (GPT-2's Conv1D and embeddings are stored transposed, a convolution kernel is flattened
to (out, in*k)), `from_matrix` goes back, and `matrix_factors(name)` gives A as (r, d_in) and B as (d_out, r).
An adapter may carry a variant: a strategy object that replaces the plain `s B A x` term and the merge
(`VARIANTS`; DoRA today).

Convolutions (Conv1d/2d/3d, grouped or not) are in conv.py, nn.MultiheadAttention in mha.py.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.adapter_layer import AdapterLayer, UnsupportedLayerError, adapter_dtype
from lorakit.methods.lora.config import LoraConfig
from lorakit.methods.lora.dora import DoraVariant
from lorakit.methods.lora.fused import compute_dtype, lora_linear
from lorakit.methods.lora.mixed import mixed_lora_forward
from lorakit.ops.matmul import linear, use_onednn
from lorakit.methods.lora.init import (
    EMBEDDING_INIT_FNS,
    INIT_FNS,
    PLAIN_INITS,
    InitContext,
    allowed_values,
    init_key,
    init_options,
)

# config flag -> variant name; a layer type lists the variants it can run in `variants`
VARIANT_FLAGS = {"use_dora": "dora"}
VARIANTS = {"dora": DoraVariant}


def requested_variant(config: LoraConfig) -> str | None:
    names = [name for flag, name in VARIANT_FLAGS.items() if getattr(config, flag, False)]
    if len(names) > 1:
        raise ValueError(f"LoraConfig: the variants {names} cannot be combined; choose one")
    return names[0] if names else None


class LoraLayer(AdapterLayer):
    """Rank, alpha, scaling, dropout and variant per adapter; subclasses own the A/B tensors and the matrix view."""

    adapter_meta_names = ("lora_dropout", "r", "lora_alpha", "scaling", "lora_variant", "base_rewritten")
    init_fns: ClassVar[dict] = INIT_FNS  # the initialisations this layer type can run
    variants: ClassVar[tuple[str, ...]] = ("dora",)  # the variants this layer type can run

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA's m, one entry per DoRA adapter
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_variant: dict[str, DoraVariant] = {}  # adapter name -> variant strategy (absent: plain LoRA)
        self.base_rewritten: dict[str, bool] = {}  # adapters whose init turned the base weight into a residual

    def _get_name(self) -> str:
        """PEFT's spelling in repr() and status reports: "lora.Linear", "lora.Embedding", "lora.Conv2d"."""
        name = type(self).__name__.removeprefix("Lora")
        if name == "Conv":  # one class for every dimension: PEFT names the dimension (its class per dimension)
            name = type(self.base_layer).__name__
        return "lora." + name

    # ---- building -------------------------------------------------------------------------------------------
    def add_adapter(self, name: str, config: LoraConfig, module_name: str) -> None:
        if self.has_adapter(name):
            raise ValueError(f"{module_name} already has an adapter named {name!r}")
        variant = self._variant_for(config, module_name)  # refuse before anything is created
        init_fn = self._init_fn(config, module_name)
        self.r[name] = config.rank_for(module_name)
        self.lora_alpha[name] = config.alpha_for(module_name)
        self.scaling[name] = config.scaling_for(module_name)
        dropout = config.lora_dropout
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._create_tensors(name, self.r[name])
        context = InitContext(self.r[name], self.scaling[name], module_name,
                              base_weight=lambda: self.to_matrix(self.dense_base_weight()).float())
        with torch.no_grad():
            residual = init_fn(*self.matrix_factors(name), context, **init_options(config.init_lora_weights))
            if residual is not None:
                self.write_base_weight(self.from_matrix(residual).to(self.dense_base_weight().dtype))
                self.base_rewritten[name] = True
        if variant is not None:
            self.lora_variant[name] = VARIANTS[variant].create(self, name)

    def _variant_for(self, config: LoraConfig, module_name: str) -> str | None:
        variant = requested_variant(config)
        if variant is not None and variant not in self.variants:
            flag = next(f for f, v in VARIANT_FLAGS.items() if v == variant)
            raise UnsupportedLayerError(
                f"{type(self.base_layer).__name__} does not support {VARIANTS[variant].label} (yet), please set "
                f"{flag} to False (LoraConfig.{flag}=True: {VARIANTS[variant].label} cannot run on {module_name}, a "
                f"{type(self.base_layer).__name__} ({type(self).__name__}); or exclude this module with "
                "exclude_modules)")
        return variant

    def _init_fn(self, config: LoraConfig, module_name: str):
        key = init_key(config.init_lora_weights)
        if key not in self.init_fns:
            raise UnsupportedLayerError(
                f"LoraConfig.init_lora_weights={config.init_lora_weights!r} cannot initialise {module_name}, a "
                f"{type(self.base_layer).__name__}; this layer type takes {allowed_values(self.init_fns)}. Exclude the "
                "module (exclude_modules) or choose another init.")
        return self.init_fns[key]

    def reset_adapter(self, name: str, config: LoraConfig, module_name: str) -> None:
        """A and B drawn again, in place (the same Parameters, which an optimizer holds), so that the adapter's
        update is zero again. Inits that rewrite the base (PiSSA, OLoRA) restart as LoRA's default (Kaiming A,
        B = 0): the base already holds everything merged so far. DoRA's magnitude becomes the row norm of the
        current base weight, so the output is unchanged by the reset."""
        key = init_key(config.init_lora_weights)
        init_fn = self.init_fns[key if key in PLAIN_INITS else "kaiming"]
        context = InitContext(self.r[name], self.scaling[name], module_name,
                              base_weight=lambda: self.to_matrix(self.dense_base_weight()).float())
        with torch.no_grad():
            init_fn(*self.matrix_factors(name), context)
            if name in self.lora_variant:
                self.lora_variant[name].reset(self, name)

    def _create_tensors(self, name: str, r: int) -> None:
        raise NotImplementedError

    # ---- the matrix view (see the module docstring) ----------------------------------------------------------
    def to_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """A base-layout weight as a (d_out, d_in) matrix (a view where possible)."""
        raise NotImplementedError

    def from_matrix(self, matrix: torch.Tensor) -> torch.Tensor:
        """Inverse of to_matrix."""
        raise NotImplementedError

    def matrix_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A as (r, d_in), B as (d_out, r)): views of the live tensors."""
        raise NotImplementedError

    def norm_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) such that s B A is what DoRA's weight norm adds to the rows of to_matrix(W): the matrix factors,
        except where the update does not have W's layout (grouped convolutions, conv.py)."""
        return self.matrix_factors(name)

    def magnitude_shape(self) -> tuple[int, ...]:
        """Shape of DoRA's magnitude vector, one value per output channel, broadcastable over this layer's
        output (PEFT's shape, so files match)."""
        raise NotImplementedError

    # ---- running ---------------------------------------------------------------------------------------------
    def lora_input(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The input of the LoRA branch: dropout(x), in the adapter's dtype (PEFT casts before the dropout)."""
        return self.lora_dropout[name](x.to(self.matrix_factors(name)[0].dtype))

    def dropout_acts(self, name: str) -> bool:
        """True when lora_input changes x (training with lora_dropout > 0)."""
        dropout = self._modules["lora_dropout"]._modules[name]  # the dict itself: run for every layer call
        return isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0

    def lora_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """s * B A x for an input already through lora_input, in this layer's output layout."""
        raise NotImplementedError

    def adapter_output(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        variant = self.lora_variant.get(name)
        if variant is not None:
            return variant.adapter_output(self, name, x, base_out)
        return self.lora_output(name, self.lora_input(name, x)).to(base_out.dtype)

    # ---- merging ---------------------------------------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """s * B @ A in the base weight's layout."""
        a, b = self.matrix_factors(name)
        delta = (b.float() @ a.float()) * self.scaling[name]
        return self.from_matrix(delta).to(self.base_weight.dtype)

    def merge_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        variant = self.lora_variant.get(name)
        return super().merge_weight(name, weight) if variant is None else variant.merge_weight(self, name, weight)

    def unmerge_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        variant = self.lora_variant.get(name)
        return super().unmerge_weight(name, weight) if variant is None else variant.unmerge_weight(self, name, weight)


class LoraLinear(LoraLayer):
    """LoRA on nn.Linear, or on transformers' Conv1D (GPT-2), whose weight is stored transposed (d_in, d_out)."""

    adapter_param_names = ("lora_A", "lora_B", "lora_magnitude_vector")

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

    def to_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T if self.fan_in_fan_out else weight

    from_matrix = to_matrix  # a transpose is its own inverse

    def matrix_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[name].weight, self.lora_B[name].weight

    def magnitude_shape(self) -> tuple[int, ...]:
        return (self.out_features,)

    def lora_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        # With A frozen (LoRA-FA), autograd keeps only A x (r values per token) for the backward, never x: linear
        # saves its input only for its weight's gradient (tests/unit/test_lora_variants.py checks this).
        return self.lora_B[name](self.lora_A[name](x)) * self.scaling[name]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The common case, one unmerged LoRA adapter (plain, or DoRA: _fused_dora_forward), runs on one autograd
        function (fused.py); no unmerged adapter (merged, disabled), the base layer alone; everything else (several
        adapters, mixed-adapter batches, fp16 activations on fp32 adapters) takes the general path of AdapterLayer.
        Run for every layer of every step and decoded token (210 calls a token for SmolLM2): the checks read the
        containers' dicts directly, as nn.Module's attribute fallback costs ~1 us a lookup (docs/performance.md,
        optimisation 27)."""
        if args or kwargs or self.routing is not None or not x.is_floating_point():
            return super().forward(x, *args, **kwargs)
        lora_a = self._modules["lora_A"]._modules
        active, merged = self.active_adapters, self.merged_adapters
        if len(active) == 1 and not merged:  # the usual case, without building a list
            running = active if active[0] in lora_a else ()
        else:
            running = [n for n in active if n not in merged and n in lora_a]
        if self.disabled or not running:
            return self.base_forward(x)
        name = running[0]
        a = lora_a[name]._parameters["weight"]
        dtype = compute_dtype(x)
        if len(running) > 1 or (a.dtype != torch.float16 and dtype == torch.float16):
            return super().forward(x)  # fp16 activations: the adapter computes in its own fp32 (range), as PEFT does
        if name in self.lora_variant:
            return self._fused_dora_forward(x, name)
        b = self._modules["lora_B"]._modules[name]._parameters["weight"]
        lora_x = self.lora_dropout[name](x) if self.dropout_acts(name) else None
        weight, bias, base_out = self._fused_base_weight()
        if weight is None:
            base_out = self.base_layer(x)
        return lora_linear(x, lora_x, base_out, weight, bias, a, b, self.scaling[name], dtype)

    def _fused_dora_forward(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """The one running adapter `name` is DoRA's: without active dropout, scale * (x W0^T + s B A x) + bias on the
        fused LoRA function (one matmul pass, its one-pass backward, the scale m / ||W0 + s B A|| applied in one pass
        each way: fused.py); the general path computes the same with the base output, the LoRA output and three
        more output-sized passes (dora.py). With dropout, or a base layer the fused function cannot multiply: the
        general path."""
        variant = self.lora_variant[name]
        weight, bias, _ = self._fused_base_weight()
        if not isinstance(variant, DoraVariant) or weight is None or self.dropout_acts(name):
            return super().forward(x)
        return lora_linear(x, None, None, weight, bias, self.lora_A[name].weight, self.lora_B[name].weight,
                           self.scaling[name], magnitude=self.lora_magnitude_vector[name],
                           norm=variant.norm(self, name))

    def base_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Without autograd (inference: merged, disabled, mixed batches), a dense base layer multiplies on the
        fastest kernel (lorakit.ops.matmul: oneDNN for bf16, and for fp32 where MKL is slow), as the fused
        training path does; with autograd, or on any other layer or device, the base layer's own forward."""
        if not args and not kwargs and not torch.is_grad_enabled() and x.is_floating_point():
            weight, bias, _ = self._fused_base_weight()
            # an nn.Linear's own forward is F.linear, which linear() calls where oneDNN does not run: one module
            # call less (Conv1D multiplies in its own way: its forward, unless oneDNN runs)
            if weight is not None and (not self.fan_in_fan_out or use_onednn(x, weight, bias)):
                return linear(x, weight, bias)
        return self.base_layer(x, *args, **kwargs)

    def _mixed_batch_forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """Rows with different adapters: batched matmuls over the stacked adapters (mixed.py) where it applies."""
        if self.merged_adapters:
            return super()._mixed_batch_forward(x, base_out)  # which refuses
        fast = mixed_lora_forward(self, x, base_out)
        return super()._mixed_batch_forward(x, base_out) if fast is None else fast

    def _fused_base_weight(self):
        """(weight as (d_out, d_in), bias, None) for a dense frozen base layer the fused function multiplies
        itself; (None, None, None) when the base layer must run its own forward (quantized, sharded, trained)."""
        base = self._modules["base_layer"]
        if type(base) not in (nn.Linear, Conv1D):
            return None, None, None
        weight = base._parameters["weight"]
        if weight.requires_grad or type(weight) not in (nn.Parameter, torch.Tensor):
            return None, None, None
        return self.to_matrix(weight), base._parameters.get("bias"), None


class LoraEmbedding(LoraLayer):
    """LoRA on nn.Embedding: h = E[ids] + s * (A^T[ids]) B^T, A: (r, num_embeddings), B: (dim, r).

    As a matrix the embedding is E^T (dim, num_embeddings): a linear map of one-hot inputs. Dropout is not
    applied: the input is token ids.
    """

    adapter_param_names = ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    init_fns = EMBEDDING_INIT_FNS

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def _create_tensors(self, name: str, r: int) -> None:
        num, dim = self.base_weight.shape
        kwargs = dict(device=self.base_weight.device, dtype=adapter_dtype(self.base_weight))
        # drawn from N(0, 1) as PEFT does (init_lora_weights=False keeps them), so a seed gives PEFT's values
        self.lora_embedding_A[name] = nn.Parameter(torch.randn(r, num, **kwargs))
        self.lora_embedding_B[name] = nn.Parameter(torch.randn(dim, r, **kwargs))

    def to_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T

    from_matrix = to_matrix

    def matrix_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A[name], self.lora_embedding_B[name]

    def magnitude_shape(self) -> tuple[int, ...]:
        return (self.base_weight.shape[1],)

    def lora_input(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return x

    def dropout_acts(self, name: str) -> bool:
        return False

    def lora_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        after_a = F.embedding(x, self.lora_embedding_A[name].T, base.padding_idx, base.max_norm,
                              base.norm_type, base.scale_grad_by_freq, base.sparse)
        return (after_a @ self.lora_embedding_B[name].T) * self.scaling[name]

