"""The training hooks of a run (training_hooks.py): the adapter method's own, then the trainer strategies'.

The loop calls whatever this returns and knows no method or strategy by name. Trainer strategies (ReLoRA,
LISA, Delta-LoRA, LoRA-drop; train/strategies/) are switched on by `train:` options and get the run's
training data through a `RunContext`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from lorakit.model import PeftModel
from lorakit.train.config import RunConfig
from lorakit.training_hooks import TrainingHook


@dataclass
class RunContext:
    """What a trainer strategy may use besides the model: the training rows and how to batch them."""

    rows: list[dict] = field(default_factory=list)  # the tokenized training rows
    collate: Callable[[list[dict]], dict] | None = None  # rows -> a batch of tensors
    device: torch.device = torch.device("cpu")
    rank: int = 0
    world_size: int = 1
    model_config: object = None  # the transformers config (for summed_token_loss under a wrapper)
    # hook name -> its state_dict() in the checkpoint being resumed (empty for a new run); for hooks that
    # restructure the model in setup(), before the checkpoint's tensors are loaded (LoRA-drop)
    resumed_state: dict[str, dict] = field(default_factory=dict)


def run_hooks(model: nn.Module, cfg: RunConfig, run: RunContext | None = None) -> list[TrainingHook]:
    from lorakit.train.strategies import strategy_hooks

    hooks = list(model.training_hooks()) if isinstance(model, PeftModel) else []
    hooks += strategy_hooks(model, cfg, run or RunContext())
    names = [hook.name for hook in hooks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"training hooks {duplicates} appear twice; give each hook a unique name")
    return hooks
