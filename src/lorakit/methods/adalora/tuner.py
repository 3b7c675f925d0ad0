"""Registration of AdaLoRA and its lifecycle.

    prepare()          refuse a config without total_step; register base_model.update_and_allocate (PEFT's API)
    inject()           SVD-form layers at rank init_r (or at the saved rank pattern's ranks, when loading)
    training_hooks()   the orthogonality penalty and the rank allocation (hook.py, allocator.py)
    state_tensors()    lora_A, lora_E, lora_B as PEFT saves them: only the kept triplets once a rank pattern exists
    transform_outputs  adds the penalty to `outputs.loss` when the model computed one, as PEFT's forward does

Training with your own loop, as with PEFT:

    loss = model(**batch).loss          # includes the orthogonality penalty
    loss.backward(); optimizer.step()
    model.base_model.update_and_allocate(global_step)
    optimizer.zero_grad()
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.inject import DEFAULT_TARGETS
from lorakit.methods.adalora.allocator import RankAllocator
from lorakit.methods.adalora.config import AdaLoraConfig
from lorakit.methods.adalora.hook import AdaLoraHook, orthogonality_penalty
from lorakit.methods.adalora.layer import SVDConv2d, SVDLinear
from lorakit.methods.quant import NF4Linear
from lorakit.registry import register_method
from lorakit.state import PREFIX
from lorakit.tuner import Tuner, bias_parameter_names

# PEFT's TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING where it differs from LoRA's defaults
DEFAULT_TARGET_MODULES = {
    **DEFAULT_TARGETS,
    "t5": ["q", "k", "v", "o", "wi", "wo"], "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "roberta": ["query", "key", "value", "dense"], "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
}


class HostAllocation:
    """`base_model.update_and_allocate(global_step)`: the rank allocation of every trainable AdaLoRA adapter of the
    model that is active (PEFT allows one trainable AdaLoRA adapter; lorakit gives each its own allocator)."""

    def __init__(self) -> None:
        self.tuners: dict[str, AdaLoraTuner] = {}

    def __call__(self, global_step: int) -> None:
        for tuner in self.tuners.values():
            if tuner.is_active():
                tuner.update_and_allocate(global_step)


@register_method("adalora")
class AdaLoraTuner(Tuner):
    config_cls = AdaLoraConfig
    display_name = "AdaLoRA"
    prefix = "lora_"
    layers = {nn.Linear: SVDLinear, Conv1D: SVDLinear, NF4Linear: SVDLinear, nn.Conv2d: SVDConv2d}
    default_target_modules = DEFAULT_TARGET_MODULES

    def __init__(self, host: nn.Module, config: AdaLoraConfig, adapter_name: str) -> None:
        super().__init__(host, config, adapter_name)
        self._allocator: RankAllocator | None = None
        self._hook: AdaLoraHook | None = None

    # ---- building ----------------------------------------------------------------------------------------
    def prepare(self) -> None:
        if self.config.total_step is None:
            raise ValueError("AdaLoraConfig.total_step is required (as in PEFT): the number of optimizer steps of the "
                             "training run, over which the rank budget goes from init_r to target_r; got None. Give "
                             "a positive integer (lorakit's trainer fills it from the run when a run config leaves it "
                             "out).")
        if not self.config.inference_mode:
            allocation = getattr(self.host, "update_and_allocate", None)
            if not isinstance(allocation, HostAllocation):
                allocation = HostAllocation()
                self.host.update_and_allocate = allocation
            allocation.tuners[self.adapter_name] = self

    def after_inject(self) -> None:
        for key in self.config.rank_pattern or {}:
            module = key.rsplit(".lora_E", 1)[0]
            if module not in self.targets:
                raise ValueError(f"AdaLoraConfig.rank_pattern names {key!r}, but this adapter does not wrap {module!r} "
                                 f"(it wraps {', '.join(self.targets[:4])}{', ...' if len(self.targets) > 4 else ''})")

    def remove(self) -> None:
        allocation = getattr(self.host, "update_and_allocate", None)
        if isinstance(allocation, HostAllocation):
            allocation.tuners.pop(self.adapter_name, None)
            if not allocation.tuners:
                del self.host.update_and_allocate

    # ---- tensors -----------------------------------------------------------------------------------------
    def trainable_base_parameters(self) -> list[str]:
        return bias_parameter_names(self.model, self.adapter_name, self.config.bias)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The live tensors; while training, once a rank pattern exists, the kept triplets of each layer instead
        (copies), as PEFT saves them. A loaded adapter is built at the pattern's ranks, so its tensors stay live."""
        tensors = super().state_tensors()
        for module in self.targets:
            kept = self.config.kept_triplets(module)
            rows = tensors[f"{PREFIX}{module}.lora_E"].shape[0]
            if kept is None or len(kept) != rows or sum(kept) == rows:
                continue
            index = torch.tensor(kept, dtype=torch.bool, device=tensors[f"{PREFIX}{module}.lora_E"].device)
            for factor, dim in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
                key = f"{PREFIX}{module}.{factor}"
                tensors[key] = tensors[key][index] if dim == 0 else tensors[key][:, index]
        return tensors

    # ---- running -----------------------------------------------------------------------------------------
    def transform_outputs(self, outputs, kwargs: dict):
        """PEFT's AdaLoraModel.forward: a loss the model computed (labels given) gets the orthogonality penalty, so
        `model(**batch).loss` is what to minimise in your own loop. lorakit's trainer adds it itself."""
        loss = getattr(outputs, "loss", None)
        if isinstance(loss, torch.Tensor) and not self.config.inference_mode:
            outputs.loss = loss + self.config.orth_reg_weight * self.orthogonality_penalty()
        return outputs

    # ---- training ----------------------------------------------------------------------------------------
    def _layers(self) -> dict[str, nn.Module]:
        return {name: self.model.get_submodule(name) for name in self.targets}

    @property
    def allocator(self) -> RankAllocator:
        if self._allocator is None:
            self._allocator = RankAllocator(self.config, self._layers(), self.adapter_name)
        return self._allocator

    def training_hooks(self) -> list[AdaLoraHook]:
        if self.config.inference_mode:
            return []
        if self._hook is None:
            self._hook = AdaLoraHook(self)
        return [self._hook]

    def orthogonality_penalty(self) -> torch.Tensor:
        return orthogonality_penalty(self._layers().values(), self.adapter_name)

    def update_and_allocate(self, global_step: int) -> None:
        """Update the importance from this step's gradients and apply the budget schedule at `global_step` (PEFT's
        AdaLoraModel.update_and_allocate). A newly allocated rank pattern goes into the config, so it is saved."""
        pattern = self.allocator.update_and_allocate(global_step)
        if pattern is not None:
            self.record_rank_pattern(pattern)

    def record_rank_pattern(self, pattern: dict[str, list[bool]] | None) -> None:
        """config.rank_pattern = pattern, with PEFT's keys ("<module>.lora_E")."""
        saved = None if pattern is None else {f"{module}.lora_E": list(kept) for module, kept in pattern.items()}
        self.config = dataclasses.replace(self.config, rank_pattern=saved)
        if self._allocator is not None:
            self._allocator.config = self.config

    def is_active(self) -> bool:
        layer = self.model.get_submodule(self.targets[0])
        return self.adapter_name in layer.active_adapters and not layer.disabled

    # ---- conformance -------------------------------------------------------------------------------------
    @classmethod
    def sample_config(cls, target_modules: list[str], identity: bool) -> AdaLoraConfig:
        """identity: E = 0; otherwise P, E, Q ~ N(0, 1) (PEFT's init_lora_weights=False)."""
        return AdaLoraConfig(init_r=4, target_r=2, total_step=10, lora_alpha=1, target_modules=target_modules,
                             init_lora_weights=identity)
