"""Registration of LoRA: its config, the layer wrapping each base layer type, and its lifecycle hooks."""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.methods.lora.config import LoraConfig
from lorakit.methods.lora.layer import LoraConv2d, LoraEmbedding, LoraLinear
from lorakit.registry import register_method
from lorakit.tuner import Tuner, bias_parameter_names, decay_groups

# Parameter-name parts of the B matrices, which LoRA+ trains with a larger learning rate.
LORA_B_NAMES = (".lora_B.", ".lora_embedding_B.")


@register_method("lora")
class LoraTuner(Tuner):
    config_cls = LoraConfig
    layers = {nn.Linear: LoraLinear, Conv1D: LoraLinear, nn.Embedding: LoraEmbedding, nn.Conv2d: LoraConv2d}

    def trainable_base_parameters(self) -> list[str]:
        """bias="all": every bias of the base model; "lora_only": the biases of layers holding this adapter."""
        return bias_parameter_names(self.model, self.adapter_name, self.config.bias)

    def parameter_groups(self, named_params: dict[str, nn.Parameter], args) -> list[dict]:
        """LoRA+ (Hayou et al. 2024, https://arxiv.org/abs/2402.12354): with `loraplus_lr_ratio`, the B matrices
        get ratio x the learning rate, since B (zero-initialised) needs larger steps than A."""
        ratio = getattr(args, "loraplus_lr_ratio", None) or 1.0

        def lr_scale(name: str) -> float:
            return ratio if any(tag in f".{name}." for tag in LORA_B_NAMES) else 1.0

        return decay_groups(named_params, args.learning_rate, args.weight_decay, lr_scale)

    @classmethod
    def sample_config(cls, target_modules: list[str], identity: bool) -> LoraConfig:
        return LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, init_lora_weights=identity)
