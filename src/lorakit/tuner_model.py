"""`PeftModel.base_model`: holds the transformers model as `.model` and answers PEFT's tuner-level API.

In PEFT, `peft_model.base_model` is a `LoraModel` (a `BaseTuner`): parameter names read
`base_model.model.<path>`, and code written for PEFT calls adapter operations on it
(`model.base_model.set_adapter([...])`, `.merge_and_unload()`, `.targeted_module_names`, `.peft_config`).
Here the adapters are managed by the PeftModel that owns this object; these methods are the same operations,
reached through `base_model` (one implementation, in PeftModel). Any other attribute falls through to the
transformers model, as with PEFT.
"""

from __future__ import annotations

import weakref

from torch import nn

# PeftModel methods that PEFT's BaseTuner also has: called on base_model, they run on the owning PeftModel.
TUNER_LEVEL_METHODS = (
    "set_adapter", "delete_adapter", "add_weighted_adapter", "merge_adapter", "unmerge_adapter", "merge_and_unload",
    "unload", "disable_adapter_layers", "enable_adapter_layers", "set_requires_grad", "get_layer_status",
    "get_model_status",
)
# ... and PeftModel properties PEFT's BaseTuner also has.
TUNER_LEVEL_PROPERTIES = ("peft_config", "active_adapters", "active_adapter", "targeted_module_names", "prefix")


class TunerModel(nn.Module):
    """Holds the transformers model as `.model`, so parameter names read `base_model.model.<path>`."""

    def __init__(self, model: nn.Module, owner: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        # a weak reference: the owner holds this module, and a module cycle would break named_modules()
        self.__dict__["_owner"] = weakref.ref(owner) if owner is not None else (lambda: None)

    @property
    def owner(self):
        """The PeftModel managing the adapters of this model."""
        owner = self.__dict__["_owner"]()
        if owner is None:
            raise RuntimeError("this base_model no longer belongs to a PeftModel (it was deleted); adapter operations "
                               "are not available on it")
        return owner

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            if name in TUNER_LEVEL_METHODS or name in TUNER_LEVEL_PROPERTIES:
                return getattr(self.owner, name)
            return getattr(self.model, name)
