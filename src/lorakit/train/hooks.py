"""The training hooks of a run (training_hooks.py): the adapter method's own, then the trainer strategies'.

The loop calls whatever this returns and knows no method by name. Trainer strategies (ReLoRA, LISA,
Delta-LoRA) are configured in `train:` and add their hooks here.
"""

from __future__ import annotations

from torch import nn

from lorakit.model import PeftModel
from lorakit.train.config import RunConfig
from lorakit.training_hooks import TrainingHook


def run_hooks(model: nn.Module, cfg: RunConfig) -> list[TrainingHook]:
    hooks = list(model.training_hooks()) if isinstance(model, PeftModel) else []
    names = [hook.name for hook in hooks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"training hooks {duplicates} appear twice; give each hook a unique name")
    return hooks
