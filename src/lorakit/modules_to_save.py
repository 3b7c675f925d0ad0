"""Trainable copies of whole modules (`modules_to_save`), e.g. a new classification head.

The original module stays frozen; each adapter gets its own full copy, trained and saved with the
adapter. Attribute names (`original_module`, `modules_to_save`) are PEFT's, so parameter names match; in
files the copy's tensors are saved under the module's own name (`classifier.weight`), as PEFT does.

The wrapper stands in for the module it wraps: its forward takes the module's arguments as they come (keyword
ones too), and attributes it does not have itself (`head.weight`, `head.out_features`) are read from the module
its forward would run: the active adapter's copy, or the original when adapters are disabled or no active
adapter has a copy here. (PEFT reads them the same way, except that it raises AttributeError in that last case.)
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

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # attributes of this wrapper itself fail normally (also while __init__ has not set them yet)
            if name in ("original_module", "modules_to_save") or "active_adapters" not in self.__dict__:
                raise
            return getattr(self._running_module(), name)

    def _running_module(self) -> nn.Module:
        """The module a forward without adapter_names runs now."""
        if self.disabled:
            return self.original_module
        return self._module_for(next((a for a in self.active_adapters if self.has_adapter(a)), None))

    def forward(self, *args, **kwargs):
        if self.routing is not None and not self.disabled:
            return self._mixed_batch_forward(args, kwargs)
        return self._running_module()(*args, **kwargs)

    def _mixed_batch_forward(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """Each adapter's rows through its copy. The rows are those of the batched input: the first positional
        argument or, when there is none, the first tensor keyword argument (other arguments pass unchanged)."""
        key, x = (None, args[0]) if args else next(
            ((k, v) for k, v in kwargs.items() if isinstance(v, torch.Tensor)), (None, None))
        if not isinstance(x, torch.Tensor):
            raise TypeError("a mixed-adapter batch (adapter_names) through a modules_to_save copy needs a batched "
                            "tensor argument to split by rows; this call has none")
        result = None
        for name, rows in self._rows_by_adapter(x):
            module = self._module_for(name)
            out = module(x[rows], *args[1:], **kwargs) if args else module(**{**kwargs, key: x[rows]})
            if result is None:
                result = out.new_zeros((x.shape[0],) + out.shape[1:])
            result = result.index_copy(0, rows, out)
        return result

    def active_copy(self) -> nn.Module:
        """The module to keep when the wrapper is removed (merge_and_unload)."""
        return self._running_module()
