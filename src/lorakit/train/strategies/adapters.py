"""Helpers for strategies over an adapter: its layers, base weights, capabilities, and optimizer state."""

from __future__ import annotations

import math

import torch
from torch import nn

from lorakit.adapter_layer import AdapterLayer
from lorakit.model import PeftModel
from lorakit.state import adapter_holders
from lorakit.tuner import MERGEABLE, WRAPS_LAYERS, Tuner


def peft_model(model: nn.Module, title: str) -> PeftModel:
    if not isinstance(model, PeftModel):
        raise ValueError(f"{title} trains an adapter; the model has none (finetuning_type adapter)")
    return model


def active_tuners(model: PeftModel) -> list[Tuner]:
    return [model.tuners[name] for name in model.active_adapters]


def require_capability(model: PeftModel, capability: str, title: str, why: str) -> None:
    """Refuse an adapter method without `capability` (tuner.py), saying why the strategy needs it."""
    for tuner in active_tuners(model):
        if capability not in tuner.capabilities:
            raise ValueError(f"{title} needs a {capability.replace('_', '-')} adapter method ({why}); "
                             f"{tuner.name} adapters are not. Use e.g. adapter.method=lora")


def require_mergeable(model: PeftModel, title: str, why: str) -> None:
    require_capability(model, WRAPS_LAYERS, title, why)
    require_capability(model, MERGEABLE, title, why)


def require_resettable(model: PeftModel, title: str) -> None:
    for tuner in active_tuners(model):
        if not tuner.can_reset():
            raise ValueError(f"{title} re-initialises the adapter, which {tuner.name} layers cannot do (they do "
                             "not implement reset_adapter)")


def adapter_layers(model: PeftModel) -> list[tuple[str, AdapterLayer, str]]:
    """(module path in the transformers model, layer, adapter name) for every active adapter of every layer."""
    out = []
    for path, holder in adapter_holders(model.get_base_model()):
        if isinstance(holder, AdapterLayer):
            out += [(path, holder, name) for name in model.active_adapters if holder.has_adapter(name)]
    return out


def check_dense_base(layers, title: str) -> None:
    """Strategies that write W need a float weight Parameter (not a quantized base layer's packed codes) and an
    update that fits it (not LoRA on a grouped convolution: merge_refusal)."""
    for path, layer, _ in layers:
        if layer.merge_refusal():
            raise ValueError(f"{title} changes the base weights by the adapter's update, but {path}: "
                             f"{layer.merge_refusal()}. Leave this module out of target_modules.")
        weight = layer.base_weight  # the weight adapters change (a MultiheadAttention's in_proj_weight)
        if not isinstance(weight, nn.Parameter) or not weight.is_floating_point() or \
                hasattr(layer.base_layer, "dequantized_weight"):
            raise ValueError(f"{title} changes the base weights, but {path} is a {type(layer.base_layer).__name__} "
                             "without a dense float weight (a quantized base?); train on a dense base model")


def base_weight_names(model: PeftModel, layers) -> list[str]:
    """Parameter names (in model.named_parameters()) of the base weights under `layers`."""
    names = {id(p): n for n, p in model.named_parameters()}
    return sorted({names[id(layer.base_weight)] for _, layer, _ in layers})


def adapter_parameters(layers) -> list[nn.Parameter]:
    """The adapters' tensors inside the layers (each once, also when layers share them)."""
    seen: dict[int, nn.Parameter] = {}
    for _, layer, name in layers:
        for tensor in layer.adapter_tensors(name).values():
            if isinstance(tensor, nn.Parameter):
                seen.setdefault(id(tensor), tensor)
    return list(seen.values())


def keep_largest(tensor: torch.Tensor, ratio: float) -> torch.Tensor:
    """Boolean mask of `tensor`'s shape: False on the floor(ratio * n) entries of smallest magnitude."""
    n = tensor.numel()
    zeroed = min(n, math.floor(ratio * n + 1e-9))
    keep = torch.zeros(n, dtype=torch.bool, device=tensor.device)
    if zeroed < n:
        keep[tensor.detach().reshape(-1).abs().float().topk(n - zeroed, sorted=False).indices] = True
    return keep.view_as(tensor)


@torch.no_grad()
def prune_optimizer_state(optimizer: torch.optim.Optimizer, params, ratio: float) -> None:
    """Magnitude-prune the per-element state of `params` (Adam's moments) by `ratio`, with one mask per parameter
    taken from the first moment (exp_avg) and applied to every moment: an entry that kept its momentum but
    lost its second moment would step by m / eps and blow up."""
    for param in params:
        state = optimizer.state.get(param, {})
        moments = [v for v in state.values() if isinstance(v, torch.Tensor) and v.shape == param.shape]
        if not moments:
            continue
        keep = keep_largest(state.get("exp_avg", moments[0]), ratio)
        for moment in moments:
            moment.mul_(keep)


def drop_optimizer_state(optimizer: torch.optim.Optimizer, params) -> None:
    """Forget the optimizer state of `params` (it is rebuilt from zero if they train again)."""
    for param in params:
        optimizer.state.pop(param, None)
        param.grad = None
