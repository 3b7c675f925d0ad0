"""The toy task convergence tests train on: pairs (t, f(t)) for a fixed random map f over 20 token ids."""

from __future__ import annotations

from typing import Callable

import torch


def toy_task() -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids (64, 12): t1 f(t1) t2 f(t2) ..., labels: the f(t) positions only)."""
    gen = torch.Generator().manual_seed(0)
    mapping = torch.randperm(20, generator=gen) + 100
    src = torch.randint(10, 30, (64, 6), generator=gen)
    ids = torch.stack([src, mapping[src - 10]], dim=2).flatten(1)
    labels = ids.clone()
    labels[:, 0::2] = -100
    return ids, labels


def train_on_toy_task(model, steps: int, lr: float = 1e-2, first_step: int = 0,
                      after_optimizer_step: Callable[[int], None] | None = None) -> list[float]:
    """AdamW on the trainable parameters, batches of 16 rows; the loss of every step. `after_optimizer_step(step)`
    runs after each optimizer step (AdaLoRA's rank allocation), steps numbered from `first_step`."""
    ids, labels = toy_task()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for step in range(first_step, first_step + steps):
        batch = slice((step * 16) % 64, (step * 16) % 64 + 16)
        loss = model(input_ids=ids[batch], labels=labels[batch]).loss
        loss.backward()
        optimizer.step()
        if after_optimizer_step is not None:
            after_optimizer_step(step)
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses
