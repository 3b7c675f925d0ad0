"""LoRA on nn.MultiheadAttention (PEFT's lora.MultiheadAttention): on its packed q/k/v projection and on its output
projection.

nn.MultiheadAttention holds the q, k and v projections as one parameter, `in_proj_weight` (3E, E), and reads
`out_proj.weight` without calling `out_proj`, so there is no layer call to add s B A x to. The adapter acts
through the weights instead, as in PEFT:

    in_proj_weight'  = W_in  + s B_in A_in       A_in: (r, E), B_in: (3E, r)    this layer's lora_A / lora_B
    out_proj.weight' = W_out + s B_out A_out      A_out: (r, E), B_out: (E, r)   a LoraLinear in base_layer.out_proj

and the base module runs with W' in place of W (torch.func.functional_call: the base parameters are never written,
and gradients reach A and B). Parameter names are PEFT's (`mha.lora_A.<adapter>.weight`,
`mha.base_layer.out_proj.lora_A.<adapter>.weight`, ...), so files match. The engine visits the nested out_proj
layer like any adapter layer (activation, saving, merging), so this class only merges in_proj_weight itself.

As in PEFT: lora_dropout is not applied (there is no separate LoRA branch whose input could be dropped); DoRA,
PiSSA and OLoRA are not available; kdim and vdim must equal embed_dim (one packed in_proj_weight). Unlike PEFT,
mixed-adapter batches work: each group of rows runs with its own adapter's weights.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.func import functional_call

from lorakit.adapter_layer import BASE_ADAPTER, adapter_dtype
from lorakit.methods.lora.init import INIT_FNS, PLAIN_INITS
from lorakit.methods.lora.layer import LoraLayer, LoraLinear

# nn.MultiheadAttention.forward's parameters, in order (positional arguments are bound to these names)
FORWARD_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
                "is_causal")


class LoraMultiheadAttention(LoraLayer):
    """LoRA on nn.MultiheadAttention; see the module docstring. Attributes of the base module (embed_dim,
    num_heads, batch_first, in_proj_weight, ...) read through."""

    adapter_param_names = ("lora_A", "lora_B")
    init_fns = {key: INIT_FNS[key] for key in PLAIN_INITS}
    variants = ()

    @classmethod
    def wrap_refusal(cls, base_layer: nn.MultiheadAttention) -> str | None:
        if not base_layer._qkv_same_embed_dim:
            return (f"with kdim={base_layer.kdim}, vdim={base_layer.vdim} and embed_dim={base_layer.embed_dim}, which "
                    "LoRA cannot wrap: Only same embed for query/key/value is supported as of now for "
                    "MultiheadAttention (one packed in_proj_weight)")
        if not isinstance(base_layer.out_proj, (nn.Linear, LoraLinear)):
            return f"whose out_proj is a {type(base_layer.out_proj).__name__}; LoRA needs an nn.Linear there"
        return None

    def __init__(self, base_layer: nn.MultiheadAttention) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        if not isinstance(base_layer.out_proj, LoraLinear):  # (already wrapped when "all-linear" took out_proj)
            base_layer.out_proj = LoraLinear(base_layer.out_proj)

    @property
    def out_proj_layer(self) -> LoraLinear:
        return self.base_layer.out_proj

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer" or "_modules" not in self.__dict__:
                raise
            return getattr(self.base_layer, name)

    @property
    def _qkv_same_embed_dim(self) -> bool:
        # torch's TransformerEncoderLayer takes a fused fast path (eval, no grad, batch_first) that reads
        # self_attn.in_proj_weight itself, skipping this forward and so the adapter; this flag is one of the
        # conditions it checks, so it reads False while an adapter acts.
        acting = not self.disabled and (self.routing is not None or bool(self._pending(self.active_adapters)))
        return self.base_layer._qkv_same_embed_dim and not acting

    # ---- building ----------------------------------------------------------------------------------------------
    def add_adapter(self, name: str, config, module_name: str) -> None:
        super().add_adapter(name, config, module_name)
        self.out_proj_layer.add_adapter(name, config, module_name)  # same r and alpha, as PEFT

    def _create_tensors(self, name: str, r: int) -> None:
        embed_dim = self.base_layer.embed_dim
        kwargs = dict(bias=False, device=self.base_weight.device, dtype=adapter_dtype(self.base_weight))
        self.lora_A[name] = nn.Linear(embed_dim, r, **kwargs)
        self.lora_B[name] = nn.Linear(r, 3 * embed_dim, **kwargs)

    # ---- the matrix view: in_proj_weight is (3E, E), laid out as an nn.Linear weight ---------------------------
    @property
    def base_weight(self) -> nn.Parameter:
        return self.base_layer.in_proj_weight

    def dense_base_weight(self) -> torch.Tensor:
        return self.base_layer.in_proj_weight

    def write_base_weight(self, weight: torch.Tensor) -> None:
        with torch.no_grad():  # the parameter's version counts the write (AdapterLayer.write_base_weight)
            self.base_layer.in_proj_weight.copy_(weight)

    def to_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    from_matrix = to_matrix

    def matrix_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[name].weight, self.lora_B[name].weight

    # ---- running -----------------------------------------------------------------------------------------------
    def _pending(self, names: list[str]) -> list[tuple[str, LoraLayer, list[str]]]:
        """(parameter name in the base module, the layer holding its adapters, those of `names` it holds and has
        not merged) for each weight some of `names` change. Only adapters of this layer count: one that "all-linear"
        put on out_proj alone has no effect, as in PEFT (nn.MultiheadAttention never calls out_proj)."""
        out = []
        for key, layer in (("in_proj_weight", self), ("out_proj.base_layer.weight", self.out_proj_layer)):
            pending = [n for n in names
                       if self.has_adapter(n) and layer.has_adapter(n) and n not in layer.merged_adapters]
            if pending:
                out.append((key, layer, pending))
        return out

    def _run(self, names: list[str], args: tuple, kwargs: dict):
        weights = {key: layer.base_weight + sum(layer.delta_weight(n) for n in pending)
                   for key, layer, pending in self._pending(names)}
        if not weights:
            return self.base_layer(*args, **kwargs)
        with _instance_attributes_replaced(self.base_layer, weights):
            return functional_call(self.base_layer, weights, args, kwargs)

    def forward(self, *args, **kwargs):
        if self.disabled:
            return self.base_layer(*args, **kwargs)
        if self.routing is not None:
            return self._mixed_batch_forward({**dict(zip(FORWARD_ARGS, args)), **kwargs})
        return self._run(self.active_adapters, args, kwargs)

    def _mixed_batch_forward(self, inputs: dict):
        """Each adapter's rows through the module with that adapter's weights; the outputs are put back in row
        order. Rows are along dim 0 (batch_first) or 1 of query/key/value, dim 0 of key_padding_mask and of the
        attention weights, and come in blocks of num_heads in a 3-D attn_mask."""
        query = inputs["query"]
        if query.dim() != 3:
            raise ValueError("mixed-adapter batches (adapter_names) need batched inputs; nn.MultiheadAttention got "
                             f"an unbatched query of shape {tuple(query.shape)}")
        dim = 0 if self.base_layer.batch_first else 1
        batch = query.shape[dim]
        attention, attention_weights = None, None
        for name, rows in self.routing.groups(batch, query.device):
            out, out_weights = self._run([] if name == BASE_ADAPTER else [name], (), self._rows(inputs, rows, dim))
            if attention is None:
                attention = out.new_zeros(out.shape[:dim] + (batch,) + out.shape[dim + 1:])
            attention = attention.index_copy(dim, rows, out)
            if out_weights is not None:
                if attention_weights is None:
                    attention_weights = out_weights.new_zeros((batch,) + out_weights.shape[1:])
                attention_weights = attention_weights.index_copy(0, rows, out_weights)
        return attention, attention_weights

    def _rows(self, inputs: dict, rows: torch.Tensor, dim: int) -> dict:
        part = dict(inputs)
        selected = {}  # query, key and value are often one tensor: select it once, so that they stay one
        for key in ("query", "key", "value"):
            tensor = inputs[key]
            if id(tensor) not in selected:
                selected[id(tensor)] = tensor.index_select(dim, rows)
            part[key] = selected[id(tensor)]
        if inputs.get("key_padding_mask") is not None:
            part["key_padding_mask"] = inputs["key_padding_mask"].index_select(0, rows)
        mask = inputs.get("attn_mask")
        if mask is not None and mask.dim() == 3:  # (batch * num_heads, L, S)
            heads = self.base_layer.num_heads
            per_head = (rows[:, None] * heads + torch.arange(heads, device=rows.device)).reshape(-1)
            part["attn_mask"] = mask.index_select(0, per_head)
        return part


@contextmanager
def _instance_attributes_replaced(module: nn.Module, weights: dict[str, torch.Tensor]):
    """Also replace the weights where an instance attribute shadows the registered parameter. FSDP with
    use_orig_params shows parameters during a no-grad forward as plain tensors in the module's __dict__, which
    attribute lookup finds before `_parameters` (the only place functional_call swaps): without this the adapter
    would have no effect under FSDP."""
    replaced = []
    for key, value in weights.items():
        owner_path, _, name = key.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        if name in owner.__dict__:
            replaced.append((owner, name, owner.__dict__[name]))
            owner.__dict__[name] = value
    try:
        yield
    finally:
        for owner, name, original in reversed(replaced):
            owner.__dict__[name] = original
