"""Preparing a run: the output directory, the model for each finetuning_type, and a run fingerprint."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import torch
from torch import nn

from lorakit.methods.quant import quantize_model
from lorakit.model import get_peft_model
from lorakit.tasks import SEQ_CLS_HEAD_NAMES
from lorakit.train.checkpoint import list_checkpoints
from lorakit.train.config import RunConfig

RUN_FILES = ("run_config.yaml", "trainer_state.json", "metrics.jsonl", "train_results.json", "loss_curve.png",
             "adapter", "model")


class RunError(RuntimeError):
    """A run stopped for a reason the user can act on (the message says how)."""


def check_output_dir(cfg: RunConfig, overwrite: bool) -> list[str]:
    """The earlier run's files in output_dir, to be replaced; refuses unless asked to (--overwrite) or resuming."""
    out = cfg.output_dir
    if os.path.isfile(out):
        raise RunError(f"output_dir {out!r} is a file; choose a directory")
    if cfg.train.resume_from_checkpoint:
        return []
    previous = [name for name in RUN_FILES if os.path.exists(os.path.join(out, name))]
    previous += [os.path.basename(path) for path in list_checkpoints(out)]  # names: out may be a relative path
    if previous and not overwrite:
        raise RunError(f"output_dir {out!r} already holds a run ({', '.join(previous[:4])}); "
                       "pass --overwrite to replace it, train.resume_from_checkpoint=latest to continue it, "
                       "or choose another output_dir")
    return previous


def prepare_output_dir(cfg: RunConfig, overwrite: bool, is_main: bool) -> None:
    """Check as `check_output_dir`, delete the earlier run's files, create the directory (also for a resume
    into a new output_dir). Call it once the model and data are ready, so bad input never costs the old run."""
    out = cfg.output_dir
    previous = check_output_dir(cfg, overwrite)
    if previous and is_main:
        for name in previous:
            path = os.path.join(out, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    os.makedirs(out, exist_ok=True)


def prepare_model(model: nn.Module, cfg: RunConfig) -> nn.Module:
    """Apply finetuning_type: inject the adapter, train everything (full), or the last N blocks (freeze).
    With `quantization`, the model's linear layers are quantized first (already done when it was loaded with
    the run's options: quantize_model leaves quantized layers alone)."""
    if cfg.quantization is not None:
        quantize_model(model, **cfg.quantization_kwargs)
    if cfg.uses_adapter:
        return get_peft_model(model, cfg.adapter)
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
    """Trainable parameters by name (the live tensors), as saved in checkpoints."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def run_fingerprint(cfg: RunConfig, model: nn.Module, num_rows: int, global_batch: int) -> dict:
    """What a checkpoint must agree on to be resumed by this run."""
    shapes = sorted((n, list(t.shape)) for n, t in trainable_tensors(model).items())
    return {
        "model": os.path.abspath(cfg.model) if os.path.isdir(cfg.model) else cfg.model,
        "architecture": type(model).__name__ if not hasattr(model, "get_base_model")
        else type(model.get_base_model()).__name__,
        "finetuning_type": cfg.finetuning_type,
        "quantization": cfg.quantization,
        "trainable": hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16],
        "num_train_rows": num_rows,
        "global_batch": global_batch,
    }


def check_fingerprint(saved: dict, current: dict, checkpoint: str) -> None:
    diffs = [f"{key}: checkpoint {saved.get(key)!r} vs this run {value!r}"
             for key, value in current.items() if saved.get(key) != value]
    if diffs:
        raise RunError(f"checkpoint {checkpoint} was made by a different run ({'; '.join(diffs)}). Resume with the "
                       "same model, adapter config, data and batch sizes, or start a new output_dir.")
