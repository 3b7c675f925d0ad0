"""Preparing a run: loading its base model (load_training_model), the model for each finetuning_type, and the one
sequence that makes a loaded model ready for its optimizer (prepare_training_model; the trainer and `lorakit bench
trainer` both call them). (The output
directory: output_dir.py; the fingerprint a resume checks: resume.py.)"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.methods.quant import quantize_model
from lorakit.model import get_peft_model
from lorakit.models.loading import load_model_and_tokenizer
from lorakit.ops.attention import use_cpu_attention
from lorakit.ops.fused_modules import use_fused_modules
from lorakit.tasks import SEQ_CLS_HEAD_NAMES
from lorakit.train import precision
from lorakit.train.config import RunConfig, TrainArgs
from lorakit.train.hooks import RunContext, run_hooks
from lorakit.training_hooks import TrainingHook


class RunError(RuntimeError):
    """A run stopped for a reason the user can act on (the message says how)."""


@dataclass(frozen=True)
class TrainingModel:
    """A model ready for its optimizer, and what the run needs to know about how it was prepared."""

    model: nn.Module  # the PeftModel (adapter runs) or the base model itself (full, freeze), on the run's device
    hooks: list[TrainingHook]  # the run's training hooks, set up
    state_names: list[str]  # what checkpoints save: trainable + hook-changed base weights (run_state_names)
    bf16: bool  # train.bf16 resolved for the device: compute under precision.autocast(device, bf16)
    # frozen weights stored in bf16 until the run ends: {name: dtype before}, for precision.restore_stored_dtypes
    stored_in_bf16: dict[str, torch.dtype]


def load_training_model(cfg: RunConfig, device: torch.device, label_names=None):
    """(model, tokenizer, loaded_dtype): the run's base model, as cfg says. A bf16 adapter run with the default
    dtype (fp32) stores its frozen weights in bf16, so a bf16 checkpoint's weights load as stored, without fp32
    copies (models/stored_bf16.py); loaded_dtype is then torch.float32, the dtype those bf16 weights stand for,
    which prepare_training_model gives every parameter it does not store in bf16. Otherwise loaded_dtype is None."""
    as_stored = loads_bf16_as_stored(cfg.dtype, cfg.uses_adapter, cfg.train, device)
    model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.task_type, label_names=label_names, dtype=cfg.dtype,
                                                device=device, bf16_as_stored=as_stored, **cfg.quantization_kwargs)
    return model, tokenizer, stored_bf16_loaded_dtype(model, as_stored)


def loads_bf16_as_stored(dtype, uses_adapter: bool, args: TrainArgs, device: torch.device) -> bool:
    """Whether a run loads a bf16 checkpoint's weights as stored (load_training_model)."""
    return dtype is None and uses_adapter and precision.resolve_bf16(args.bf16, device)


def stored_bf16_loaded_dtype(model: nn.Module, as_stored: bool) -> torch.dtype | None:
    """torch.float32 when a load asked for bf16_as_stored got bf16 weights (a bf16 checkpoint), else None."""
    return torch.float32 if as_stored and any(p.dtype == torch.bfloat16 for p in model.parameters()) else None


def prepare_training_model(base: nn.Module, cfg: RunConfig, device: torch.device, run: RunContext,
                           loaded_dtype: torch.dtype | None = None) -> TrainingModel:
    """From the loaded base model to a model ready for build_optimizer, in this order (each step needs the one
    before it):
    1. finetuning_type applied (prepare_model: the adapter injected and initialised from the RNG as the caller
       seeded it; PiSSA's and OLoRA's residuals computed in fp32), then moved to `device`;
    2. activation checkpointing when train.gradient_checkpointing;
    3. the run's training hooks built (`run` with its model_config taken from the prepared model) and set up: they
       may restructure the model (LoRA-drop) or pick base weights to rewrite (ReLoRA, Delta-LoRA);
    4. state_names, from the model as the hooks left it;
    5. apply_training_precision, keeping the state_names (hook-rewritten base weights stay fp32) out of bf16.
    `base` is changed in place (the adapter goes into it). loaded_dtype: load_training_model's."""
    args = cfg.train
    model = prepare_model(base, cfg).to(device)
    if args.gradient_checkpointing:
        _enable_activation_checkpointing(model.get_base_model() if hasattr(model, "get_base_model") else model)
    hooks = run_hooks(model, cfg, dataclasses.replace(run, model_config=getattr(model, "config", None)))
    for hook in hooks:
        hook.setup(model)
    state_names = run_state_names(model, hooks)
    bf16, stored_in_bf16 = apply_training_precision(model, args, device, keep=set(state_names),
                                                    store_frozen_in_bf16=cfg.uses_adapter, loaded_dtype=loaded_dtype)
    return TrainingModel(model, hooks, state_names, bf16, stored_in_bf16)


def apply_training_precision(model: nn.Module, args: TrainArgs, device: torch.device, keep: set[str] = frozenset(),
                             store_frozen_in_bf16: bool = True,
                             loaded_dtype: torch.dtype | None = None) -> tuple[bool, dict[str, torch.dtype]]:
    """train.bf16, train.fused_modules and train.cpu_attention on a model whose adapters are in and initialised
    (a residual the init computes must be computed in fp32 first). With bf16 (resolved for `device`) the frozen
    weights are stored in bf16 (precision.py), except those named in `keep` and all of them when not
    `store_frozen_in_bf16` (full and freeze runs: LISA unfreezes blocks as it goes); then the fused modules go in,
    and on the CPU lorakit's attention kernel (ops/attention.py; bf16 and fp32). Returns (bf16, {name: dtype before} of
    the weights stored in bf16, for precision.restore_stored_dtypes). loaded_dtype: load_training_model's (a bf16
    checkpoint's weights as stored, standing for fp32)."""
    bf16 = precision.resolve_bf16(args.bf16, device)
    if loaded_dtype is not None and not (bf16 and store_frozen_in_bf16):
        raise ValueError("a model loaded with its bf16 weights as stored needs a bf16 adapter run to store them")
    stored_in_bf16 = (precision.store_frozen_weights_in_bf16(model, keep=keep, loaded_dtype=loaded_dtype)
                      if bf16 and store_frozen_in_bf16 else {})
    if args.fused_modules:
        use_fused_modules(model)
    if args.cpu_attention and device.type == "cpu":
        use_cpu_attention(model)
    return bf16, stored_in_bf16


def _enable_activation_checkpointing(model) -> None:
    """Non-reentrant, so it works with frozen inputs. transformers 5.x renamed the method (the old name warns and
    goes in v6); older releases only have the old one."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


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
        raise ValueError(f"{type(model).__name__} has no list of transformer blocks; "
                         "use finetuning_type adapter or full")
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

