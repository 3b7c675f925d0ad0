"""Registration of LoRA: its config, the layer wrapping each base layer type, and its lifecycle hooks."""

from __future__ import annotations

import dataclasses

from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.methods.lora.config import LoraConfig
from lorakit.methods.lora.conv import LoraConv
from lorakit.methods.lora.layer import LoraEmbedding, LoraLayer, LoraLinear
from lorakit.methods.lora.mha import LoraMultiheadAttention
from lorakit.methods.quant import NF4Linear
from lorakit.registry import register_method
from lorakit.state import adapter_holders
from lorakit.tuner import Tuner, bias_parameter_names, decay_groups

# Parameter-name parts of the B matrices, which LoRA+ trains with a larger learning rate.
LORA_B_NAMES = (".lora_B.", ".lora_embedding_B.")
# The A tensors LoRA-FA freezes. Not the embeddings' A: it starts at zero (the reference init), so frozen it
# would keep the update at zero; PEFT's LoRA-FA leaves it trainable too.
LORA_FA_FROZEN = ("lora_A.",)


@register_method("lora")
class LoraTuner(Tuner):
    config_cls = LoraConfig
    display_name = "LoRA"
    # NF4Linear (QLoRA): a quantized linear base layer, wrapped like nn.Linear (its `weight` gives shape and dtype)
    layers = {nn.Linear: LoraLinear, Conv1D: LoraLinear, NF4Linear: LoraLinear, nn.Embedding: LoraEmbedding,
              nn.Conv1d: LoraConv, nn.Conv2d: LoraConv, nn.Conv3d: LoraConv,
              nn.MultiheadAttention: LoraMultiheadAttention}
    train_options = frozenset({"loraplus_lr_ratio", "lora_fa"})

    def __init__(self, host: nn.Module, config: LoraConfig, adapter_name: str) -> None:
        super().__init__(host, config, adapter_name)
        # LoRA-FA (Zhang et al. 2023, https://arxiv.org/abs/2308.03303): A stays at its random init, only B (and
        # DoRA's magnitude) train. Set by the trainer option train.lora_fa or lorakit.enable_lora_fa(model).
        self.lora_fa = False

    def inject(self) -> list[str]:
        try:
            return super().inject()
        except Exception:
            self._restore_rewritten_bases()
            raise

    def _restore_rewritten_bases(self) -> None:
        """A failed injection (PiSSA with r above a later layer's rank, ...) leaves the base model as it was:
        layers whose init already turned W0 into the residual W0 - s B A get W0 back."""
        for _, layer in adapter_holders(self.model):
            if isinstance(layer, LoraLayer) and layer.base_rewritten.get(self.adapter_name):
                layer.write_base_weight(layer.dense_base_weight() + layer.delta_weight(self.adapter_name))
                del layer.base_rewritten[self.adapter_name]

    def trainable_base_parameters(self) -> list[str]:
        """bias="all": every bias of the base model; "lora_only": the biases of layers holding this adapter."""
        return bias_parameter_names(self.model, self.adapter_name, self.config.bias)

    def set_trainable(self, flag: bool) -> None:
        super().set_trainable(flag)
        if flag and self.lora_fa:
            for _, holder in adapter_holders(self.model):
                for key, tensor in holder.adapter_tensors(self.adapter_name).items():
                    if key.startswith(LORA_FA_FROZEN):
                        tensor.requires_grad_(False)

    def configure_training(self, args) -> None:
        if getattr(args, "lora_fa", False):
            self.lora_fa = True

    def parameter_groups(self, named_params: dict[str, nn.Parameter], args) -> list[dict]:
        """LoRA+ (Hayou et al. 2024, https://arxiv.org/abs/2402.12354): with `loraplus_lr_ratio`, the B matrices
        get ratio x the learning rate, since B (zero-initialised) needs larger steps than A."""
        ratio = getattr(args, "loraplus_lr_ratio", None) or 1.0

        def lr_scale(name: str) -> float:
            return ratio if any(tag in f".{name}." for tag in LORA_B_NAMES) else 1.0

        return decay_groups(named_params, args.learning_rate, args.weight_decay, lr_scale)

    @classmethod
    def combine_adapters(cls, peft_model, adapters, weights, adapter_name, **options) -> None:
        from lorakit.methods.lora.arithmetic import combine_lora_adapters

        combine_lora_adapters(peft_model, adapters, weights, adapter_name, **options)

    def convert_for_initial_model(self, tensors, config, initial_dir):
        from lorakit.methods.lora.conversion import convert_to_plain_lora

        return convert_to_plain_lora(tensors, config, initial_dir)

    @classmethod
    def sample_config(cls, target_modules: list[str], identity: bool) -> LoraConfig:
        return LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, init_lora_weights=identity)

    @classmethod
    def sample_configs(cls, target_modules: list[str], identity: bool, base_layer: nn.Module) -> dict[str, LoraConfig]:
        """Plain LoRA, and each variant (DoRA) and base-rewriting init (PiSSA, OLoRA) the layer class wrapping
        `base_layer` can run (their init is the identity either way; the suite perturbs identity=False adapters)."""
        plain = cls.sample_config(target_modules, identity)
        layer_cls = cls.layer_class_for(base_layer)
        configs = {"plain": plain}
        if "dora" in layer_cls.variants:
            configs["dora"] = dataclasses.replace(plain, use_dora=True)
        for init in ("pissa", "olora"):
            if init in layer_cls.init_fns:
                configs[init] = dataclasses.replace(plain, init_lora_weights=init)
        return configs

def enable_lora_fa(peft_model, adapter_names: list[str] | None = None) -> None:
    """LoRA-FA from Python: freeze the A matrices of these LoRA adapters (default: the active ones) for good, so
    only B (and DoRA's magnitudes) train; the backward then keeps A x (r values per token) instead of x. The run
    config's equivalent is `train: {lora_fa: true}`."""
    names = peft_model.active_adapters if adapter_names is None else list(adapter_names)
    for name in names:
        tuner = peft_model.tuners.get(name)
        if not isinstance(tuner, LoraTuner):
            raise ValueError(f"enable_lora_fa: adapter {name!r} is not a LoRA adapter "
                             f"({'unknown' if tuner is None else tuner.name}); LoRA-FA freezes LoRA's A matrices")
        tuner.lora_fa = True
    peft_model.set_adapter(peft_model.active_adapters)  # re-applies trainability
