"""Optimizer and learning-rate schedule.

AdamW over the trainable parameters only, in groups: weight decay for matrices, none for biases, norm
weights and other vectors. An adapter's method may split the groups further (LoRA+ gives the B matrices
`loraplus_lr_ratio` times the learning rate): `PeftModel.parameter_groups`, from the method's Tuner.
Training hooks (training_hooks.py) may reshape the schedule (ReLoRA's restarts) through `lr_factor`.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from lorakit.model import PeftModel
from lorakit.train.config import TrainArgs
from lorakit.tuner import decay_groups


def parameter_groups(model: nn.Module, args: TrainArgs) -> list[dict]:
    """Trainable parameters in groups, each with its own lr and weight decay."""
    if isinstance(model, PeftModel):  # its adapter's method decides
        groups = model.parameter_groups(args)
    else:
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        groups = decay_groups(named, args.learning_rate, args.weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters; check finetuning_type and the adapter config")
    return groups


def build_optimizer(model: nn.Module, args: TrainArgs) -> torch.optim.AdamW:
    groups = parameter_groups(model, args)
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                             eps=args.adam_epsilon, fused=_fused_kernel_runs(groups, args))


def _fused_kernel_runs(groups: list[dict], args: TrainArgs) -> bool:
    """FSDP's sharded parameters keep the per-tensor loop; everything else as `fused_adamw_runs` says."""
    return args.distributed != "fsdp" and fused_adamw_runs([p for group in groups for p in group["params"]])


def fused_adamw_runs(params: list) -> bool:
    """Whether PyTorch's fused AdamW (one kernel over every tensor) can run the step: plain floating-point tensors
    on one device type it has the kernel for. On CPU, where PyTorch otherwise loops tensor by tensor, the step over
    SmolLM2's 420 LoRA tensors takes 6.5 instead of 22 ms (2 threads; docs/performance.md). The update equals the
    loop's to fp32 rounding (another order of operations)."""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    devices = {p.device.type for p in params}
    return (len(devices) == 1 and devices <= set(_get_fused_kernels_supported_devices())
            and all(type(p) is nn.Parameter and p.is_floating_point() for p in params))


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


def build_scheduler(optimizer: torch.optim.Optimizer, args: TrainArgs, total_steps: int, hooks=()) -> LambdaLR:
    warmup = warmup_steps(args, total_steps)

    def factor(step: int) -> float:
        value = lr_factor(step, warmup, total_steps, args.lr_scheduler)
        for hook in hooks:
            value = hook.lr_factor(step, value)
        return value

    return LambdaLR(optimizer, factor)
