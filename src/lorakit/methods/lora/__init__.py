"""LoRA and its layers; importing this package registers the "lora" method."""

from lorakit.methods.lora.config import LoraConfig
from lorakit.methods.lora.conv import LoraConv
from lorakit.methods.lora.layer import LoraEmbedding, LoraLayer, LoraLinear
from lorakit.methods.lora.mha import LoraMultiheadAttention
from lorakit.methods.lora.tuner import LoraTuner, enable_lora_fa

__all__ = ["LoraConfig", "LoraConv", "LoraEmbedding", "LoraLayer", "LoraLinear", "LoraMultiheadAttention", "LoraTuner",
           "enable_lora_fa"]
