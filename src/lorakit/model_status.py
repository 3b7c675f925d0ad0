"""What the adapters of a model look like right now: PEFT's `get_layer_status` / `get_model_status`.

One `TunerLayerStatus` per adapter-bearing module (adapter layers and modules_to_save wrappers), and a
`TunerModelStatus` summing them up; a value that differs between layers (some enabled, some not) is reported
as "irregular", which means the model is in an inconsistent state. Field names are PEFT's.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Literal

from torch import nn

from lorakit.adapter_layer import AdapterHolder

Irregular = Literal["irregular"]


@dataclass
class TunerLayerStatus:
    name: str  # module path in the transformers model, e.g. "model.layers.0.self_attn.q_proj"
    module_type: str  # e.g. "lora.Linear" (PEFT's spelling: method.layer type)
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]  # adapter -> its tensors' requires_grad in this layer
    available_adapters: list[str]
    devices: dict[str, list[str]]  # adapter -> device types of its tensors
    quantization_backend: str | None


@dataclass
class TunerModelStatus:
    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None | Irregular


def _all_or_irregular(values) -> bool | Irregular:
    values = list(values)
    if all(v is True for v in values):
        return True
    if all(v is False for v in values):
        return False
    return "irregular"


def layer_status(holders: list[tuple[str, AdapterHolder]]) -> list[TunerLayerStatus]:
    """The status of each adapter-bearing module; ValueError when there is none."""
    out = []
    for name, holder in holders:
        adapters = sorted(holder.adapter_names)
        tensors = {a: list(holder.adapter_tensors(a).values()) for a in adapters}
        backend = getattr(getattr(holder, "base_layer", None), "quantization_backend", None)
        out.append(TunerLayerStatus(
            name=name,
            module_type=holder._get_name(),  # as repr() names it ("lora.Linear")
            enabled=not holder.disabled,
            active_adapters=[a for a in holder.active_adapters if holder.has_adapter(a)] or list(holder.active_adapters),
            merged_adapters=list(getattr(holder, "merged_adapters", [])),
            requires_grad={a: _all_or_irregular(t.requires_grad for t in ts) for a, ts in tensors.items() if ts},
            available_adapters=adapters,
            devices={a: sorted({t.device.type for t in ts}) for a, ts in tensors.items()},
            quantization_backend=backend,
        ))
    if not out:
        raise ValueError("No adapter layers found in the model, please ensure that it's a PEFT model or that you have "
                         "PEFT adapters injected in the model.")
    return out


def model_status(model: nn.Module, holders, peft_types: dict[str, str], adapter_model_type: str,
                 counts: tuple[int, int]) -> TunerModelStatus:
    """Sum up layer_status over the model (see TunerModelStatus)."""
    layers = layer_status(holders)
    enabled = {s.enabled for s in layers}
    active = {tuple(s.active_adapters) for s in layers}
    merged_anywhere = {a for s in layers for a in s.merged_adapters}
    merged: list[str] | Irregular = sorted(merged_anywhere)
    if any((set(s.available_adapters) - set(s.merged_adapters)) & merged_anywhere for s in layers):
        merged = "irregular"
    grads = collections.defaultdict(list)
    devices = collections.defaultdict(set)
    for s in layers:
        for adapter, value in s.requires_grad.items():
            grads[adapter].append(value)
        for adapter, kinds in s.devices.items():
            devices[adapter].update(kinds)
    backends = {s.quantization_backend for s in layers}
    return TunerModelStatus(
        base_model_type=type(model).__name__,
        adapter_model_type=adapter_model_type,
        peft_types=peft_types,
        trainable_params=counts[0],
        total_params=counts[1],
        num_adapter_layers=len(layers),
        enabled=enabled.pop() if len(enabled) == 1 else "irregular",
        active_adapters=list(active.pop()) if len(active) == 1 else "irregular",
        merged_adapters=merged,
        requires_grad={a: _all_or_irregular(v) for a, v in grads.items()},
        available_adapters=sorted({a for s in layers for a in s.available_adapters}),
        devices={a: sorted(k) for a, k in devices.items()},
        quantization_backend=backends.pop() if len(backends) == 1 else "irregular",
    )
