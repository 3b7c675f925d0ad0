"""Hot-swapping a LoRA adapter: replace an adapter's weights and scalings in place by another adapter's (PEFT's
`hotswap_adapter`), keeping every tensor object, so a compiled model (torch.compile) runs the new adapter without
recompiling and optimizers or hooks holding the tensors keep working.

The two adapters must target the same modules with the same ranks (the tensors are copied into, never replaced),
and agree on the options the weights do not carry (use_rslora, lora_dropout, use_dora, alpha_pattern), as in PEFT.
lora_alpha may differ: the per-layer scalings s = lora_alpha / r are updated.
"""

from __future__ import annotations

from lorakit.adapter_files import read_adapter_config, read_adapter_weights
from lorakit.methods.lora.config import LoraConfig
from lorakit.methods.lora.layer import LoraLayer
from lorakit.model_files import adapter_directory, load_state

# config options that change the adapter's output besides its weights and alpha: they must be equal
KEYS_TO_MATCH = ("use_rslora", "lora_dropout", "alpha_pattern", "use_dora")


def hotswap_adapter(model, model_name_or_path: str, adapter_name: str, torch_device=None, **kwargs) -> None:
    """Load the adapter at `model_name_or_path` into the existing adapter `adapter_name` of `model` (a PeftModel)."""
    if adapter_name not in model.peft_config:
        raise ValueError(f"Adapter {adapter_name} does not exist; this model has {sorted(model.peft_config)}")
    directory = adapter_directory(model_name_or_path, kwargs)
    new = read_adapter_config(directory)
    old = model.peft_config[adapter_name]
    if type(new) is not type(old):
        raise ValueError(f"Incompatible PEFT types found: {old.peft_type} and {new.peft_type}")
    if not isinstance(new, LoraConfig):
        raise ValueError(f"Hotswapping only supports LORA but {new.peft_type} was passed.")
    for key in KEYS_TO_MATCH:
        if getattr(old, key) != getattr(new, key):
            raise ValueError(f"Configs are incompatible: for {key}, {getattr(old, key)} != {getattr(new, key)}")
    weights = read_adapter_weights(directory, allow_pickle=kwargs.get("allow_pickle", False))
    if torch_device is not None:
        weights = {k: v.to(torch_device) for k, v in weights.items()}
    load_state(model, adapter_name, weights, directory)  # same keys and shapes, or an error naming the module
    for path, layer in model._holders():
        if isinstance(layer, LoraLayer) and layer.has_adapter(adapter_name):
            layer.lora_alpha[adapter_name] = new.alpha_for(path)
            layer.scaling[adapter_name] = new.scaling_for(path)
    new.inference_mode = old.inference_mode
    model.tuners[adapter_name].config = new
