"""What methods and trainer strategies may do from inside the training loop.

The loop (train/loop.py) runs, for each optimizer step:

    hook.setup(model)                       once, before the optimizer is built
    hook.on_train_start(step, optimizer)    once the optimizer exists and a resume restored every state
    for each micro-batch:  loss = token loss + sum(hook.extra_loss(model))   -> backward
    hook.before_optimizer_step(step)       gradients complete (clipped); weights still the old ones
    optimizer.step(); scheduler.step()
    hook.after_optimizer_step(step)        new weights, gradients still present (AdaLoRA's importance)
    optimizer.zero_grad()
    hook.on_step_end(step, optimizer)      may change weights, trainability and optimizer state (ReLoRA, LISA)

`step` counts finished optimizer steps (1 after the first). A hook's `state_dict()` is saved in every
checkpoint and given back to `load_state_dict()` on resume, so a resumed run equals an uninterrupted one.
A hook that changes frozen weights (ReLoRA's merges, Delta-LoRA's W updates) names them in
`changed_base_parameters()`: checkpoints then save and restore them with the trainable parameters, and the
run's result is the whole model with the adapter merged, since the adapter alone no longer reproduces it.
Hooks come from the adapter's tuner (`Tuner.training_hooks()`: AdaLoRA's budget, an orthogonality or
router-balance loss) and from trainer options (ReLoRA, LISA, Delta-LoRA, LoRA-drop in train/strategies/);
the loop knows only this interface, never a method's name.
"""

from __future__ import annotations

import torch
from torch import nn


class TrainingHook:
    """Base class: every method is a no-op. Subclasses set `name` (unique in a run; keys checkpoint state)."""

    name: str = "hook"

    def check_run(self, total_steps: int) -> None:
        """Refuse settings that do not fit the run (a period longer than the run, ...) with a ValueError."""

    def setup(self, model: nn.Module) -> None:
        """Before the optimizer is built: e.g. mark every parameter the hook may train as trainable, so that
        the optimizer holds it (LISA), or record initial weights."""

    def changed_base_parameters(self) -> list[str]:
        """Names (as in `model.named_parameters()` of the model given to setup) of parameters outside the
        optimizer that this hook changes. Asked once, after setup()."""
        return []

    def on_train_start(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Once before the first step this process runs (`step` = steps already done: 0, or the resumed
        step), after the optimizer is built and a resume restored weights, optimizer and hook state: e.g.
        freeze what must not train yet and drop its optimizer state (LISA)."""

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """A term added to the loss of every micro-batch, weighted by its share of the step's tokens (so the
        step's loss gets it once). None: nothing."""
        return None

    def before_optimizer_step(self, step: int) -> None:
        """Gradients of this step are complete; weights not yet updated (step = steps done so far)."""

    def after_optimizer_step(self, step: int) -> None:
        """The optimizer has updated the weights; gradients are still present. `step` includes this one."""

    def on_step_end(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """After zero_grad: change weights, what is trainable, or the optimizer state (keep it consistent)."""

    def lr_factor(self, step: int, factor: float) -> float:
        """Reshape the learning-rate schedule: `factor` is the scheduler's multiplier at `step` (0-based)."""
        return factor

    def state_dict(self) -> dict:
        """What a resume needs, as JSON values and torch tensors (saved with safetensors, never pickle)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()` from a checkpoint."""
