"""LoRA configuration (field names and defaults as in HuggingFace PEFT's LoraConfig).

LoRA: Hu et al. 2021, https://arxiv.org/abs/2106.09685. rsLoRA: Kalajdzievski 2023,
https://arxiv.org/abs/2312.03732. DoRA: Liu et al. 2024, https://arxiv.org/abs/2402.09353 (dora.py). PiSSA and
OLoRA initialisations: init.py.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field

from lorakit.config import (
    PeftConfig,
    PeftType,
    check_choice,
    check_positive,
    check_range,
    check_target_fields,
    unsupported,
)

BIAS_CHOICES = ("none", "all", "lora_only")


def pattern_value(patterns: dict, module_name: str, default):
    """PEFT's rank/alpha pattern lookup: the first key that matches the end of the module name, e.g.
    "q_proj" or "layers.0.self_attn.q_proj" or a regex like "layers\\.[0-3]\\..*"."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


@dataclass
class LoraRuntimeConfig:
    """PEFT's per-run LoRA options (never saved). lorakit runs on what it is given: ephemeral GPU offload (moving
    CPU-offloaded weights to the GPU for DoRA's initialisation) is not implemented and must stay False."""

    ephemeral_gpu_offload: bool = False


def _no_runtime_options(value) -> bool:
    if isinstance(value, dict):
        return not value.get("ephemeral_gpu_offload")
    return not getattr(value, "ephemeral_gpu_offload", False)


# PEFT's LoraConfig options lorakit does not implement, shared with the configs that extend LoRA's (AdaLoRA):
# field -> (PEFT's default, what it does). Accepted at their neutral value, refused otherwise (config.unsupported).
UNSUPPORTED_LORA_OPTIONS = {
    "megatron_config": (None, "LoRA on Megatron-LM parallel layers"),
    "trainable_token_indices": (None, "training selected token embeddings"),
    "loftq_config": ({}, "LoftQ initialisation"),
    "eva_config": (None, "EVA initialisation"),
    "corda_config": (None, "CorDA initialisation"),
    "lora_ga_config": (None, "LoRA-GA initialisation"),
    "velora_config": (None, "VeLoRA activation compression"),
    "alora_invocation_tokens": (None, "activated LoRA (aLoRA)"),
    "use_qalora": (False, "QA-LoRA"),
    "monteclora_config": (None, "MonteCLoRA"),
    "layer_replication": (None, "layer replication"),
    "lora_bias": (False, "a bias on lora_B"),
    "target_parameters": (None, "LoRA on bare nn.Parameters"),
    "use_bdlora": (None, "block-diagonal LoRA"),
    "arrow_config": (None, "Arrow routing"),
    "kasa_config": (None, "KaSA"),
    "ensure_weight_tying": (False, "keeping tied weights tied in modules_to_save copies"),
}


@dataclass
class UnsupportedLoraOptions(PeftConfig):
    """The fields of UNSUPPORTED_LORA_OPTIONS, for LoraConfig and the configs that extend PEFT's LoraConfig
    (AdaLoRA): accepted at PEFT's default only."""

    megatron_config: dict | None = unsupported(*UNSUPPORTED_LORA_OPTIONS["megatron_config"])
    trainable_token_indices: list | dict | None = unsupported(*UNSUPPORTED_LORA_OPTIONS["trainable_token_indices"])
    loftq_config: dict = unsupported(*UNSUPPORTED_LORA_OPTIONS["loftq_config"])
    eva_config: dict | None = unsupported(*UNSUPPORTED_LORA_OPTIONS["eva_config"])
    corda_config: dict | None = unsupported(*UNSUPPORTED_LORA_OPTIONS["corda_config"])
    lora_ga_config: dict | None = unsupported(*UNSUPPORTED_LORA_OPTIONS["lora_ga_config"])
    velora_config: dict | None = unsupported(*UNSUPPORTED_LORA_OPTIONS["velora_config"])
    alora_invocation_tokens: list | None = unsupported(*UNSUPPORTED_LORA_OPTIONS["alora_invocation_tokens"])
    use_qalora: bool = unsupported(*UNSUPPORTED_LORA_OPTIONS["use_qalora"])
    monteclora_config: dict | None = unsupported(*UNSUPPORTED_LORA_OPTIONS["monteclora_config"])
    layer_replication: list | None = unsupported(*UNSUPPORTED_LORA_OPTIONS["layer_replication"])
    lora_bias: bool = unsupported(*UNSUPPORTED_LORA_OPTIONS["lora_bias"])
    target_parameters: list | None = unsupported(*UNSUPPORTED_LORA_OPTIONS["target_parameters"])
    use_bdlora: dict | None = unsupported(*UNSUPPORTED_LORA_OPTIONS["use_bdlora"])
    arrow_config: dict | None = unsupported(*UNSUPPORTED_LORA_OPTIONS["arrow_config"])
    kasa_config: dict | None = unsupported(*UNSUPPORTED_LORA_OPTIONS["kasa_config"])
    ensure_weight_tying: bool = unsupported(*UNSUPPORTED_LORA_OPTIONS["ensure_weight_tying"])


@dataclass
class LoraConfig(UnsupportedLoraOptions):
    """h = W0 x + s * B A dropout(x), with s = lora_alpha / r (or lora_alpha / sqrt(r) with use_rslora)."""

    peft_type: PeftType | str | None = PeftType.LORA

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
    # Only used with PEFT's Megatron / QA-LoRA options (unsupported here): stored so that PEFT's files round-trip.
    megatron_core: str | None = "megatron.core"
    qalora_group_size: int = 16
    # PEFT's per-run options (not saved); see LoraRuntimeConfig.
    runtime_config: LoraRuntimeConfig = unsupported(None, "ephemeral GPU offload", neutral=_no_runtime_options)

    def __post_init__(self) -> None:
        if self.runtime_config is None:
            self.runtime_config = LoraRuntimeConfig()
        super().__post_init__()
        init = str(self.init_lora_weights).lower()
        if self.use_rslora and (self.rank_pattern or self.alpha_pattern) and init.startswith(("pissa", "olora")):
            # once, when built; as PEFT, a warning only: the user may never convert the adapter
            warnings.warn("Using Rank-Stabilized LoRA with rank_pattern/alpha_pattern and post-training conversion of "
                          "modified base weights (PiSSA/OLoRA) means that you won't be able to pass "
                          "`path_initial_model_for_weight_conversion` to `save_pretrained` to restore the initial "
                          "values of the base weights; if you intend to do this, please ensure not to use rslora or "
                          "rank_pattern/alpha_pattern.", UserWarning, stacklevel=3)

    def validate(self) -> None:
        super().validate()
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
        for name in ("rank_pattern", "alpha_pattern"):
            patterns = getattr(self, name)
            if not isinstance(patterns, dict):
                raise ValueError(f"LoraConfig.{name} must be a dict {{pattern: value}}, got {patterns!r}")
            for key, value in patterns.items():
                check_positive(owner, f"{name}[{key!r}]", value, integer=(name == "rank_pattern"))
        check_target_fields(owner, self)

    def rank_for(self, module_name: str) -> int:
        return pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return pattern_value(self.alpha_pattern, module_name, self.lora_alpha)

    def scaling_for(self, module_name: str) -> float:
        r, alpha = self.rank_for(module_name), self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

