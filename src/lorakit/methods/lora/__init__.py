"""LoRA and its layers; importing this package registers the "lora" method."""

from lorakit.methods.lora.config import LoraConfig
from lorakit.methods.lora.layer import LoraConv2d, LoraEmbedding, LoraLayer, LoraLinear
from lorakit.methods.lora.tuner import LoraTuner, enable_lora_fa

__all__ = ["LoraConfig", "LoraConv2d", "LoraEmbedding", "LoraLayer", "LoraLinear", "LoraTuner", "enable_lora_fa"]
