"""Preparing a run: the model for each finetuning_type. (The output directory: output_dir.py; the fingerprint a
resume checks: resume.py.)"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lorakit.methods.quant import quantize_model
from lorakit.model import get_peft_model
from lorakit.tasks import SEQ_CLS_HEAD_NAMES
from lorakit.train.config import RunConfig


class RunError(RuntimeError):
    """A run stopped for a reason the user can act on (the message says how)."""


def prepare_model(model: nn.Module, cfg: RunConfig) -> nn.Module:
    """Apply finetuning_type: inject the adapter, train everything (full), or the last N blocks (freeze).
    With `quantization`, the model's linear layers are quantized first (already done when it was loaded with
    the run's options: quantize_model leaves quantized layers alone)."""
    if cfg.quantization is not None:
        quantize_model(model, **cfg.quantization_kwargs)
    if cfg.uses_adapter:
        # a copy: get_peft_model records the base model's name on the config it is given (as PEFT); the run
        # config stays as the user wrote it, so that run_config.yaml reproduces the run
        peft_model = get_peft_model(model, copy.deepcopy(cfg.adapter))
        peft_model.configure_training(cfg.train)  # the method's own trainer options (LoRA-FA)
        return peft_model
    if cfg.finetuning_type == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    for param in model.parameters():
        param.requires_grad_(False)
    blocks = transformer_blocks(model)
    n = cfg.train.freeze_trainable_layers
    if n > len(blocks):
        raise ValueError(f"train.freeze_trainable_layers={n} but the model has only {len(blocks)} blocks")
    trained = list(blocks[-n:]) + [getattr(model, h) for h in SEQ_CLS_HEAD_NAMES
                                   if cfg.task_type == "SEQ_CLS" and hasattr(model, h)]
    for module in trained:
        for param in module.parameters():
            param.requires_grad_(True)
    return model


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of repeated blocks: the ModuleList holding the most parameters."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no list of transformer blocks; use finetuning_type adapter or full")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by name (the live tensors)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def run_state_names(model: nn.Module, hooks) -> list[str]:
    """What a checkpoint saves and a resume restores: the parameters trainable once the hooks are set up (LISA
    freezes some of them later, for a while), and base parameters a hook changes (ReLoRA, Delta-LoRA)."""
    names = set(trainable_tensors(model))
    for hook in hooks:
        names.update(hook.changed_base_parameters())
    known = {name for name, _ in model.named_parameters()}
    unknown = sorted(names - known)
    if unknown:
        raise ValueError(f"training hooks name parameters the model does not have: {unknown[:3]}")
    return sorted(names)


def named_tensors(model: nn.Module, names) -> dict[str, torch.Tensor]:
    """The live parameters called `names` (looked up again after sharding replaced them)."""
    wanted = set(names)
    return {name: p for name, p in model.named_parameters() if name in wanted}

