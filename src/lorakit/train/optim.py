"""Optimizer and learning-rate schedule.

AdamW over the trainable parameters only, in groups: weight decay for matrices, none for biases, norm
weights and other vectors; with LoRA+ (Hayou et al. 2024, https://arxiv.org/abs/2402.12354) the B
matrices get `loraplus_lr_ratio` times the learning rate, since B (zero-initialised) needs larger steps
than A for efficient feature learning.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from lorakit.train.config import TrainArgs

LORA_B_NAMES = (".lora_B.", ".lora_embedding_B.")


def parameter_groups(model: nn.Module, args: TrainArgs) -> list[dict]:
    """Trainable parameters split by (decay, LoRA+ B); each group carries its own lr and weight decay."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = param.ndim >= 2
        is_b = args.loraplus_lr_ratio is not None and any(tag in f".{name}." for tag in LORA_B_NAMES)
        groups.setdefault((decay, is_b), []).append(param)
    if not groups:
        raise ValueError("the model has no trainable parameters; check finetuning_type and the adapter config")
    ratio = args.loraplus_lr_ratio or 1.0
    return [
        {"params": params, "weight_decay": args.weight_decay if decay else 0.0,
         "lr": args.learning_rate * (ratio if is_b else 1.0)}
        for (decay, is_b), params in sorted(groups.items())
    ]


def build_optimizer(model: nn.Module, args: TrainArgs) -> torch.optim.AdamW:
    return torch.optim.AdamW(parameter_groups(model, args), lr=args.learning_rate,
                             betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)


def warmup_steps(args: TrainArgs, total_steps: int) -> int:
    return args.warmup_steps or math.ceil(args.warmup_ratio * total_steps)


def lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """Multiplier of the peak learning rate at `step` (0-based): linear warm-up, then the schedule."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, args: TrainArgs, total_steps: int) -> LambdaLR:
    warmup = warmup_steps(args, total_steps)
    return LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total_steps, args.lr_scheduler))
