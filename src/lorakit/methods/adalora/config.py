"""AdaLoRA configuration (field names and defaults as in HuggingFace PEFT's AdaLoraConfig, which extends LoraConfig;
the LoRA fields AdaLoRA uses are repeated here).

AdaLoRA: Zhang et al. 2023, https://arxiv.org/abs/2303.10512.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass

from lorakit.config import PeftType, check_choice, check_positive, check_range, check_target_fields, unsupported
from lorakit.methods.lora.config import LoraRuntimeConfig, UnsupportedLoraOptions, _no_runtime_options

BIAS_CHOICES = ("none", "all", "lora_only")
# A rank_pattern key: "<module path>.lora_E", or PEFT's in-memory form with the adapter name after it.
RANK_PATTERN_KEY = re.compile(r"^(?P<module>.+)\.lora_E(\.[A-Za-z0-9_\-]+)?$")


@dataclass
class AdaLoraConfig(UnsupportedLoraOptions):
    """h = W0 x + lora_alpha / ranknum * P diag(E) Q dropout(x), P = lora_B (d_out, r), E = lora_E (r, 1),
    Q = lora_A (r, d_in); the rank budget shrinks from init_r to target_r per layer on average while training.

    Schedule (steps counted as the trainer counts finished optimizer steps, 1, 2, ...): no pruning up to `tinit`;
    then the total budget falls on a cubic curve, masking the least important triplets every `deltaT` steps; at
    step `total_step - tfinal` the final rank pattern is fixed (and saved in `rank_pattern`), and the last `tfinal`
    steps train with it.
    """

    peft_type: PeftType | str | None = PeftType.ADALORA

    # Average rank per layer at the end of the budget schedule.
    target_r: int = 8
    # Rank of every layer at the start.
    init_r: int = 12
    # Steps of warm-up before any pruning.
    tinit: int = 0
    # Steps of final fine-tuning with the final rank pattern.
    tfinal: int = 0
    # Interval, in steps, between two budget allocations.
    deltaT: int = 1  # noqa: N815 (PEFT's name)
    # EMA factors of the sensitivity |w * grad w| (beta1) and of its uncertainty (beta2), in (0, 1).
    beta1: float = 0.85
    beta2: float = 0.85
    # Weight of the orthogonality penalty on P and Q added to the training loss (0 = none).
    orth_reg_weight: float = 0.5
    # Optimizer steps of the training run; required. lorakit's trainer fills it from the run when left out.
    total_step: int | None = None
    # The allocated ranks, written at the end of the budget schedule: {"<module>.lora_E": [kept?, ...] (init_r
    # booleans)}. A saved adapter holds only the kept triplets; loading builds each layer at that rank.
    rank_pattern: dict | None = None
    # --- LoRA's fields, as PEFT's AdaLoraConfig inherits them ---
    # Unused by AdaLoRA (init_r is the rank), kept so that PEFT's files load; PEFT warns when it is set.
    r: int = 8
    # Which modules get AdaLoRA (nn.Linear, Conv1D, nn.Conv2d): names, dotted suffixes, a regex, or "all-linear";
    # None uses the architecture's default.
    target_modules: list[str] | str | None = None
    # Modules never targeted, same syntax as target_modules.
    exclude_modules: list[str] | str | None = None
    # Scale numerator: the update is lora_alpha / ranknum * P diag(E) Q, ranknum = init_r.
    lora_alpha: float = 8
    # Dropout on the input of the AdaLoRA branch, in [0, 1).
    lora_dropout: float = 0.0
    # True when the base weight is stored (d_in, d_out), as in GPT-2's Conv1D; set from the layer type anyway.
    fan_in_fan_out: bool = False
    # Which biases to train: "none", "all", or "lora_only" (biases of the targeted layers).
    bias: str = "none"
    # Modules trained in full and saved with the adapter, e.g. a freshly initialised classifier head.
    modules_to_save: list[str] | None = None
    # True: E = 0, P and Q ~ N(0, 0.02^2) (the adapter starts as the identity). False: all N(0, 1) (tests only).
    init_lora_weights: bool = True
    # Only these layer indices (int or list), found via layers_pattern ("layers", "h", ...) in module names.
    layers_to_transform: list[int] | int | None = None
    # Name of the layer list in module names when layers_to_transform is used.
    layers_pattern: list[str] | str | None = None
    # Stored so that PEFT's files round-trip (used only with options lorakit does not implement).
    megatron_core: str | None = "megatron.core"
    qalora_group_size: int = 16
    runtime_config: LoraRuntimeConfig = unsupported(None, "ephemeral GPU offload", neutral=_no_runtime_options)
    # --- LoRA options PEFT's AdaLoraConfig inherits and lorakit's AdaLoRA does not implement (PEFT's defaults only) ---
    use_rslora: bool = unsupported(False, "rsLoRA scaling (AdaLoRA scales by lora_alpha / ranknum)")
    alpha_pattern: dict = unsupported({}, "per-module alphas")
    use_dora: bool = unsupported(False, "DoRA")

    def __post_init__(self) -> None:
        if self.runtime_config is None:
            self.runtime_config = LoraRuntimeConfig()
        super().__post_init__()
        if self.r != 8:  # once, when built (validate() runs again at every use)
            warnings.warn(f"AdaLoraConfig.r={self.r} is not used by AdaLoRA (as in PEFT); init_r={self.init_r} is the "
                          "initial rank and target_r the final average rank", stacklevel=4)

    def validate(self) -> None:
        super().validate()
        owner = "AdaLoraConfig"
        check_positive(owner, "init_r", self.init_r, integer=True)
        check_positive(owner, "target_r", self.target_r, integer=True)
        if self.target_r > self.init_r:
            raise ValueError(f"{owner}.target_r={self.target_r} must be at most init_r={self.init_r} (the budget only "
                             "shrinks)")
        for name in ("tinit", "tfinal"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{owner}.{name} must be an integer >= 0 (a number of steps), got {value!r}")
        check_positive(owner, "deltaT", self.deltaT, integer=True)
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ValueError(f"{owner}.{name} must be in (0, 1), got {value!r}")
        check_range(owner, "orth_reg_weight", self.orth_reg_weight, 0.0, float("inf"))
        if self.total_step is not None:
            check_positive(owner, "total_step", self.total_step, integer=True)
            if self.tinit >= self.total_step - self.tfinal:
                raise ValueError(
                    f"{owner}: tinit={self.tinit} and tfinal={self.tfinal} leave no budget phase in total_step="
                    f"{self.total_step} steps; tinit + tfinal must be below total_step (lower tinit or tfinal, or "
                    "raise total_step)")
        check_positive(owner, "lora_alpha", self.lora_alpha)
        check_range(owner, "lora_dropout", self.lora_dropout, 0.0, 1.0)
        check_choice(owner, "bias", self.bias, BIAS_CHOICES)
        for name in ("init_lora_weights", "fan_in_fan_out"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{owner}.{name} must be True or False, got {getattr(self, name)!r}")
        check_positive(owner, "r", self.r, integer=True)
        check_target_fields(owner, self)
        self._check_rank_pattern(owner)

    def _check_rank_pattern(self, owner: str) -> None:
        pattern = self.rank_pattern
        if pattern is None:
            return
        shape = "{'<module>.lora_E': [true, false, ...]} (one boolean per triplet: kept or pruned)"
        if not isinstance(pattern, dict):
            raise ValueError(f"{owner}.rank_pattern must be None or {shape}, got {pattern!r}")
        for key, mask in pattern.items():
            if not isinstance(key, str) or not RANK_PATTERN_KEY.match(key):
                raise ValueError(f"{owner}.rank_pattern key {key!r} must name a module's lora_E, as in {shape}")
            if not isinstance(mask, (list, tuple)) or not all(isinstance(v, bool) for v in mask):
                raise ValueError(f"{owner}.rank_pattern[{key!r}] must be a list of booleans, as in {shape}; "
                                 f"got {mask!r}")

    def kept_triplets(self, module_name: str) -> list[bool] | None:
        """rank_pattern's mask for a module path (None when the pattern does not name it)."""
        for key, mask in (self.rank_pattern or {}).items():
            if RANK_PATTERN_KEY.match(key).group("module") == module_name:
                return list(mask)
        return None

    def fill_from_run(self, total_steps: int) -> "AdaLoraConfig":
        """total_step = the run's optimizer steps, when it was left out."""
        if self.total_step is not None:
            return self
        try:
            return dataclasses.replace(self, total_step=total_steps)
        except ValueError as err:
            raise ValueError(f"{err} (total_step was filled from the run: {total_steps} optimizer steps)") from None
