"""What AdaLoRA does from inside the training loop (training_hooks.py): the orthogonality penalty on the loss, and
the importance update and budget allocation after each optimizer step (allocator.py).

Orthogonality (the paper's Eq. 4 keeps P and Q near-orthogonal, so that E holds the singular values):

    R = orth_reg_weight * mean over the adapter's P and Q of ||P^T P - I||_F and ||Q Q^T - I||_F

as the authors' released code and PEFT compute it: the mean of the Frobenius norms (not their squared sum, as
Eq. 4 writes it), so the loss and its gradient are PEFT's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from lorakit.training_hooks import TrainingHook

if TYPE_CHECKING:
    from lorakit.methods.adalora.tuner import AdaLoraTuner


def orthogonality_penalty(layers, adapter_name: str) -> torch.Tensor:
    """Mean over the layers' Q (lora_A, r x d_in) and P (lora_B, d_out x r) of ||Q Q^T - I||_F and ||P^T P - I||_F
    (unweighted), in PEFT's order: each layer's Q, then its P."""
    norms = []
    for layer in layers:
        for gram in (layer.lora_A[adapter_name] @ layer.lora_A[adapter_name].T,
                     layer.lora_B[adapter_name].T @ layer.lora_B[adapter_name]):
            eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
            norms.append(torch.norm(gram - eye, p="fro"))
    return sum(norms) / len(norms)


class AdaLoraHook(TrainingHook):
    """One adapter's penalty and rank allocation; its state (importance EMAs, rank pattern) is checkpointed."""

    def __init__(self, tuner: "AdaLoraTuner") -> None:
        self.tuner = tuner
        self.name = f"adalora_{tuner.adapter_name}"

    def check_run(self, total_steps: int) -> None:
        total_step = self.tuner.config.total_step
        if total_step > total_steps:
            raise ValueError(f"AdaLoraConfig.total_step={total_step} is longer than this run ({total_steps} optimizer "
                             "steps): the rank budget would never reach target_r. Set total_step to at most "
                             f"{total_steps}, or leave it out (the trainer then uses the run's steps)")

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        weight = self.tuner.config.orth_reg_weight
        return weight * self.tuner.orthogonality_penalty() if weight else None

    def after_optimizer_step(self, step: int) -> None:
        self.tuner.update_and_allocate(step)

    def state_dict(self) -> dict:
        return self.tuner.allocator.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.tuner.allocator.load_state_dict(state)
        self.tuner.record_rank_pattern(self.tuner.allocator.rank_pattern)
