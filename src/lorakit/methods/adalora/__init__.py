"""AdaLoRA (Zhang et al. 2023, https://arxiv.org/abs/2303.10512); importing this package registers "adalora"."""

from lorakit.methods.adalora.allocator import RankAllocator, budget_schedule
from lorakit.methods.adalora.config import AdaLoraConfig
from lorakit.methods.adalora.hook import AdaLoraHook, orthogonality_penalty
from lorakit.methods.adalora.layer import SVDConv2d, SVDLinear
from lorakit.methods.adalora.tuner import AdaLoraTuner

__all__ = ["AdaLoraConfig", "AdaLoraHook", "AdaLoraTuner", "RankAllocator", "SVDConv2d", "SVDLinear",
           "budget_schedule", "orthogonality_penalty"]
