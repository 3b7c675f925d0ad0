"""Trainable copies of whole modules (`modules_to_save`), e.g. a new classification head.

The original module stays frozen; each adapter gets its own full copy, trained and saved with the
adapter. Attribute names (`original_module`, `modules_to_save`) are PEFT's, so parameter names match; in
files the copy's tensors are saved under the module's own name (`classifier.weight`), as PEFT does.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lorakit.adapter_layer import BASE_ADAPTER, AdapterHolder


def is_trainable_copy(parameter_name: str) -> bool:
    """True for parameters inside a ModulesToSaveWrapper (the copies and the frozen original)."""
    return ".modules_to_save." in f".{parameter_name}" or ".original_module." in f".{parameter_name}"


class ModulesToSaveWrapper(AdapterHolder):
    adapter_param_names = ("modules_to_save",)

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()

    def add_adapter(self, name: str, config=None, module_name: str = "") -> None:
        if self.has_adapter(name):
            raise ValueError(f"{module_name} already has a trainable copy for adapter {name!r}")
        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return dict(self.modules_to_save[name].state_dict(keep_vars=True)) if self.has_adapter(name) else {}

    def _module_for(self, name: str | None) -> nn.Module:
        if name is None or name == BASE_ADAPTER or not self.has_adapter(name):
            return self.original_module
        return self.modules_to_save[name]

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if self.disabled:
            return self.original_module(x, *args, **kwargs)
        if self.routing is not None:
            return self._mixed_batch_forward(x, *args, **kwargs)
        active = next((a for a in self.active_adapters if self.has_adapter(a)), None)
        return self._module_for(active)(x, *args, **kwargs)

    def _mixed_batch_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = None
        for name, rows in self._rows_by_adapter(x):
            out = self._module_for(name)(x[rows], *args, **kwargs)
            if result is None:
                result = out.new_zeros((x.shape[0],) + out.shape[1:])
            result = result.index_copy(0, rows, out)
        return result

    def active_copy(self) -> nn.Module:
        """The module to keep when the wrapper is removed (merge_and_unload)."""
        active = next((a for a in self.active_adapters if self.has_adapter(a)), None)
        return self._module_for(None if self.disabled else active)
