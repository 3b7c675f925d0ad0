"""Registration of LoRA: the config class and the layer type each base layer type gets."""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.adapter_layer import AdapterLayer
from lorakit.modules_to_save import is_trainable_copy
from lorakit.methods.lora.config import LoraConfig
from lorakit.methods.lora.layer import LoraConv2d, LoraEmbedding, LoraLinear
from lorakit.registry import AdapterMethod, register_method


@register_method("lora")
class LoraMethod(AdapterMethod):
    config_cls = LoraConfig
    layers = {nn.Linear: LoraLinear, Conv1D: LoraLinear, nn.Embedding: LoraEmbedding, nn.Conv2d: LoraConv2d}

    @classmethod
    def extra_trainable_parameters(cls, model: nn.Module, config: LoraConfig, adapter_name: str) -> list[str]:
        """bias="all": every bias of the base model; "lora_only": the biases of layers holding this adapter."""
        if config.bias == "all":
            return [name for name, _ in model.named_parameters()
                    if name.rsplit(".", 1)[-1] == "bias" and not is_trainable_copy(name)]
        if config.bias == "lora_only":
            return [f"{name}.base_layer.bias" for name, module in model.named_modules()
                    if isinstance(module, AdapterLayer) and module.has_adapter(adapter_name)
                    and getattr(module.base_layer, "bias", None) is not None]
        return []

    @classmethod
    def sample_config(cls, target_modules: list[str], identity: bool) -> LoraConfig:
        return LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, init_lora_weights=identity)
