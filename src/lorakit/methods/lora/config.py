"""LoRA configuration (field names and defaults as in HuggingFace PEFT's LoraConfig).

LoRA: Hu et al. 2021, https://arxiv.org/abs/2106.09685. rsLoRA: Kalajdzievski 2023,
https://arxiv.org/abs/2312.03732. DoRA: Liu et al. 2024, https://arxiv.org/abs/2402.09353 (dora.py). PiSSA and
OLoRA initialisations: init.py.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import ClassVar

from lorakit.config import PeftConfig, check_choice, check_positive, check_range

BIAS_CHOICES = ("none", "all", "lora_only")


def pattern_value(patterns: dict, module_name: str, default):
    """PEFT's rank/alpha pattern lookup: the first key that matches the end of the module name, e.g.
    "q_proj" or "layers.0.self_attn.q_proj" or a regex like "layers\\.[0-3]\\..*"."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


@dataclass(frozen=True)
class LoraConfig(PeftConfig):
    """h = W0 x + s * B A dropout(x), with s = lora_alpha / r (or lora_alpha / sqrt(r) with use_rslora)."""

    peft_type: ClassVar[str] = "LORA"

    # Rank of the update B A.
    r: int = 8
    # Which modules get LoRA: a list of names or dotted suffixes ("q_proj", "layers.0.self_attn.q_proj"),
    # a regex matched against the full module name, or "all-linear" (every linear layer but the output head).
    # None uses a per-architecture default (the attention query and value projections).
    target_modules: list[str] | str | None = None
    # Modules never targeted, same syntax as target_modules (no "all-linear").
    exclude_modules: list[str] | str | None = None
    # Scale numerator: s = lora_alpha / r.
    lora_alpha: float = 8
    # Dropout on the input of the LoRA branch, in [0, 1).
    lora_dropout: float = 0.0
    # True when the base weight is stored (d_in, d_out), as in GPT-2's Conv1D; set from the layer type anyway.
    fan_in_fan_out: bool = False
    # Which biases to train: "none", "all", or "lora_only" (biases of the targeted layers).
    bias: str = "none"
    # rsLoRA: s = lora_alpha / sqrt(r), stable at large r.
    use_rslora: bool = False
    # Modules trained in full and saved with the adapter, e.g. a freshly initialised classifier head.
    modules_to_save: list[str] | None = None
    # A init: True (Kaiming-uniform, B = 0), "gaussian" (A ~ N(0, 1/r), B = 0), False (random B: tests only);
    # "pissa" (SVD: the top r singular directions of W0 go into B A, W0 becomes the residual), "pissa_niter_K"
    # (the same with a randomized SVD of K subspace iterations), "olora" (QR: W0 = QR, B = Q_r, A = R_r, residual).
    init_lora_weights: bool | str = True
    # Only these layer indices (int or list), found via layers_pattern ("layers", "h", ...) in module names.
    layers_to_transform: list[int] | int | None = None
    # Name of the layer list in module names when layers_to_transform is used (default: any "<name>.<index>.").
    layers_pattern: list[str] | str | None = None
    # Per-module ranks, {pattern: r}; patterns as for pattern matching in PEFT (suffix or regex).
    rank_pattern: dict = field(default_factory=dict)
    # Per-module alphas, {pattern: lora_alpha}.
    alpha_pattern: dict = field(default_factory=dict)
    # DoRA (weight-decomposed LoRA): W' = m * (W0 + s B A) / ||W0 + s B A|| per output row, with a trained
    # magnitude vector m (`lora_magnitude_vector`) initialised to the row norms of W0.
    use_dora: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = "LoraConfig"
        check_positive(owner, "r", self.r, integer=True)
        check_positive(owner, "lora_alpha", self.lora_alpha)
        check_range(owner, "lora_dropout", self.lora_dropout, 0.0, 1.0)
        check_choice(owner, "bias", self.bias, BIAS_CHOICES)
        from lorakit.methods.lora.init import INIT_FNS, UNSUPPORTED_PEFT_INITS, allowed_values, init_key

        init = self.init_lora_weights
        if not isinstance(init, (bool, str)) or init_key(init) not in INIT_FNS:
            note = " (a PEFT initialisation lorakit does not implement)" if init_key(init) in UNSUPPORTED_PEFT_INITS \
                else ""
            raise ValueError(f"LoraConfig.init_lora_weights must be one of {allowed_values(INIT_FNS)}; got "
                             f"{init!r}{note}")
        if not isinstance(self.use_dora, bool):
            raise ValueError(f"LoraConfig.use_dora must be true or false, got {self.use_dora!r}")
        for name in ("target_modules", "exclude_modules", "modules_to_save", "layers_pattern"):
            _check_names(owner, name, getattr(self, name))
        if isinstance(self.target_modules, (list, tuple, set)) and not self.target_modules:
            raise ValueError("LoraConfig.target_modules is empty; name at least one module, or use 'all-linear'")
        for name in ("rank_pattern", "alpha_pattern"):
            patterns = getattr(self, name)
            if not isinstance(patterns, dict):
                raise ValueError(f"LoraConfig.{name} must be a dict {{pattern: value}}, got {patterns!r}")
            for key, value in patterns.items():
                check_positive(owner, f"{name}[{key!r}]", value, integer=(name == "rank_pattern"))
        if isinstance(self.target_modules, str):
            for name in ("layers_to_transform", "layers_pattern"):
                if getattr(self, name) is not None:
                    raise ValueError(f"LoraConfig.{name}={getattr(self, name)!r} cannot be used with target_modules="
                                     f"{self.target_modules!r} (a regex or 'all-linear'); list module names instead, "
                                     "or select layers in the regex")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(f"LoraConfig.layers_pattern={self.layers_pattern!r} needs layers_to_transform "
                             "(the layer indices to adapt)")
        layers = self.layers_to_transform
        if layers is not None and not (isinstance(layers, int) or all(isinstance(i, int) for i in layers)):
            raise ValueError(f"LoraConfig.layers_to_transform must be an int or a list of ints, got {layers!r}")
        for name in ("target_modules", "exclude_modules", "modules_to_save", "layers_pattern", "layers_to_transform"):
            value = getattr(self, name)
            if isinstance(value, (tuple, set)):  # JSON has lists only
                object.__setattr__(self, name, sorted(value) if isinstance(value, set) else list(value))

    def rank_for(self, module_name: str) -> int:
        return pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return pattern_value(self.alpha_pattern, module_name, self.lora_alpha)

    def scaling_for(self, module_name: str) -> float:
        r, alpha = self.rank_for(module_name), self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _check_names(owner: str, name: str, value) -> None:
    if value is None or isinstance(value, str):
        return
    if not isinstance(value, (list, tuple, set)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{owner}.{name} must be a string or a list of strings, got {value!r}")
