"""VeRA configuration (field names and defaults as in HuggingFace PEFT's VeraConfig).

VeRA: Kopiczko et al. 2023, https://arxiv.org/abs/2310.11454.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorakit.config import PeftConfig, PeftType, check_choice, check_positive, check_range, check_target_fields

BIAS_CHOICES = ("none", "all", "vera_only")


@dataclass
class VeraConfig(PeftConfig):
    """h = W0 x + diag(b) B diag(d) A dropout(x): A (r, d_in), B (d_out, r) frozen, random and shared by every
    layer; d (r) and b (d_out) trained per layer."""

    peft_type: PeftType | str | None = PeftType.VERA

    # Rank of the shared projections. Larger than LoRA ranks: VeRA trains only r + d_out values per layer.
    r: int = 256
    # Which modules get VeRA (nn.Linear or Conv1D): names, dotted suffixes, a regex, or "all-linear";
    # None uses the architecture's default (the attention query and value projections).
    target_modules: list[str] | str | None = None
    # Seed of the shared projections A and B (a torch.Generator on the CPU, as PEFT draws them).
    projection_prng_key: int = 0
    # Save A and B in the adapter file. False: they are regenerated from projection_prng_key when loading.
    save_projection: bool = True
    # Dropout on the input of the VeRA branch, in [0, 1).
    vera_dropout: float = 0.0
    # Initial value of every entry of vera_lambda_d (the paper's d; small values, <= 0.1, work best).
    d_initial: float = 0.1
    # True when the base weight is stored (d_in, d_out), as in GPT-2's Conv1D; set from the layer type anyway.
    fan_in_fan_out: bool = False
    # Which biases to train: "none", "all", or "vera_only" (biases of the targeted layers).
    bias: str = "none"
    # Modules trained in full and saved with the adapter, e.g. a freshly initialised classifier head.
    modules_to_save: list[str] | None = None
    # True: b = 0, d = d_initial (the adapter starts as the identity). False: b = 1, d ~ N(0, 1) (tests only).
    init_weights: bool = True
    # Only these layer indices (int or list), found via layers_pattern ("layers", "h", ...) in module names.
    layers_to_transform: list[int] | int | None = None
    # Name of the layer list in module names when layers_to_transform is used.
    layers_pattern: list[str] | str | None = None

    def validate(self) -> None:
        super().validate()
        owner = "VeraConfig"
        check_positive(owner, "r", self.r, integer=True)
        check_range(owner, "vera_dropout", self.vera_dropout, 0.0, 1.0)
        check_choice(owner, "bias", self.bias, BIAS_CHOICES)
        for name in ("save_projection", "init_weights", "fan_in_fan_out"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{owner}.{name} must be True or False, got {getattr(self, name)!r}")
        if isinstance(self.projection_prng_key, bool) or not isinstance(self.projection_prng_key, int):
            raise ValueError(f"{owner}.projection_prng_key must be an integer (a torch.Generator seed), "
                             f"got {self.projection_prng_key!r}")
        if isinstance(self.d_initial, bool) or not isinstance(self.d_initial, (int, float)):
            raise ValueError(f"{owner}.d_initial must be a number (the initial value of vera_lambda_d), "
                             f"got {self.d_initial!r}")
        check_target_fields(owner, self)
