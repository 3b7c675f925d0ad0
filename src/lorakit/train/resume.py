"""Resuming honestly: a checkpoint continues only the run that made it, and a setting changed on resume either
takes effect (with a warning that says so) or is refused by name, never recorded in run_config.yaml and ignored.

A checkpoint records the run config and a fingerprint of what cannot change within a run, by content:
  model_weights    the base model's tensors (names, shapes, dtypes and a sample of values): the model, not its path
  train_examples   the tokenised training examples and class names: data file content, format, template,
                   cutoff_len, packing, tokenizer, validation split ... whatever changes what is trained on
  val_examples     the tokenised validation examples (may change: a warning)
  trainable        names and shapes of the trained tensors (adapter config, finetuning_type)
  global_batch     batch_size x gradient_accumulation_steps x processes

Settings that take effect from the resumed step on (a warning lists them): learning rate, AdamW betas, epsilon
and weight decay, the schedule (lr_scheduler, warmup, max_steps / num_epochs: the schedule is recomputed for the
new length), gradient clipping, bf16, activation checkpointing, logging / evaluation / saving intervals and
every eval.* option. Any other difference is refused, naming the setting and both values.
"""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import torch

from lorakit.train import checkpoint as ckpt
from lorakit.train.config import RunConfig
from lorakit.train.distributed import DistContext, copy_full_into, load_optimizer_state
from lorakit.train.setup import RunError, named_tensors

logger = logging.getLogger(__name__)

# Settings read afresh at every step or rebuilt on resume: they take effect, with a warning.
TAKES_EFFECT = {f"train.{name}" for name in (
    "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "lr_scheduler", "warmup_steps",
    "warmup_ratio", "num_epochs", "max_steps", "max_grad_norm", "bf16", "gradient_checkpointing", "fused_modules",
    "cpu_attention", "threads", "logging_steps",
    "eval_steps", "save_steps", "save_total_limit")}
# Of those, the ones the optimizer's param groups and the schedule hold: re-applied after loading the state.
OPTIMIZER_SETTINGS = {f"train.{name}" for name in (
    "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "lr_scheduler", "warmup_steps",
    "warmup_ratio", "num_epochs", "max_steps")}
BATCH_SETTINGS = ("train.batch_size", "train.gradient_accumulation_steps")
NOT_COMPARED = {"output_dir", "train.resume_from_checkpoint"}  # a resume may go into a new output_dir
SAMPLED_VALUES = 64  # values per tensor in the model hash: catches other weights at a negligible cost
_MISSING = object()


# ---- fingerprint ---------------------------------------------------------------------------------
def weights_hash(model: torch.nn.Module, loaded_dtype: torch.dtype | None = None) -> str:
    """Content hash of a model's tensors: names, shapes, dtypes and SAMPLED_VALUES evenly spaced values each.
    loaded_dtype: the dtype the model's bf16 tensors stand for (a bf16 checkpoint's weights kept as stored,
    train/setup.py): hashed as that dtype, so the hash is the one of the model loaded in it."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // SAMPLED_VALUES)][:SAMPLED_VALUES].float().cpu().numpy()
        dtype = loaded_dtype if loaded_dtype is not None and tensor.dtype == torch.bfloat16 else tensor.dtype
        digest.update(f"{name}|{tuple(tensor.shape)}|{dtype}|".encode())
        digest.update(sample.tobytes())
    return digest.hexdigest()[:16]


def examples_hash(rows: list[dict], label_names=None) -> str:
    """Content hash of tokenised examples (every field, in order) and the class names."""
    digest = hashlib.sha256(json.dumps(list(label_names or [])).encode())
    for row in rows:
        for key in sorted(row):
            digest.update(key.encode())
            digest.update(np.asarray(row[key], dtype=np.int64).tobytes())
        digest.update(b"|")
    return digest.hexdigest()[:16]


def run_fingerprint(model_weights: str, state: dict[str, torch.Tensor], train_rows: list[dict],
                    val_rows: list[dict], label_names, global_batch: int) -> dict:
    """What a checkpoint must agree on to be resumed by this run (see the module docstring); `state`: the tensors
    checkpoints save (trainable ones, and base weights training hooks change)."""
    shapes = sorted((n, list(t.shape)) for n, t in state.items())
    return {
        "model_weights": model_weights,
        "train_examples": examples_hash(train_rows, label_names),
        "val_examples": examples_hash(val_rows, label_names),
        "trainable": hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16],
        "global_batch": global_batch,
    }


# ---- comparing -----------------------------------------------------------------------------------
def check_resumable(state: dict, cfg: RunConfig, fingerprint: dict, checkpoint: str) -> dict[str, str]:
    """Refuse (RunError naming each setting) a checkpoint made by a different run; return the changed settings
    that take effect, as {setting: "old -> new"}."""
    saved_fp, saved_cfg = state.get("fingerprint", {}), state.get("config")
    if saved_cfg is None:  # written by an earlier lorakit: only its fingerprint can be compared
        diffs = [f"{key}: checkpoint {saved_fp[key]!r} vs this run {value!r}"
                 for key, value in fingerprint.items() if key in saved_fp and saved_fp[key] != value]
        if diffs:
            raise RunError(_refusal(checkpoint, diffs))
        return {}
    old, new = _flatten(saved_cfg), _flatten(_as_json(cfg.to_dict()))
    differing = sorted(k for k in old.keys() | new.keys()
                       if k not in NOT_COMPARED and old.get(k, _MISSING) != new.get(k, _MISSING))
    refused, changed = [], {}
    for key in differing:
        if key == "model" or key.startswith("data.") or key in BATCH_SETTINGS:
            continue  # judged by content below
        if key in TAKES_EFFECT or key.startswith("eval."):
            changed[key] = _change(old, new, key)
        else:
            refused.append(_difference(old, new, key))
    data_keys = [k for k in differing if k.startswith("data.")]
    if saved_fp.get("model_weights") != fingerprint["model_weights"]:
        refused.append(f"model: the checkpoint was trained on {old.get('model')!r} and this run loads "
                       f"{new.get('model')!r}, whose weights differ" if old.get("model") != new.get("model") else
                       f"model: the weights of {new.get('model')!r} changed since the checkpoint was made")
    if saved_fp.get("train_examples") != fingerprint["train_examples"]:
        refused.append("data: the training examples differ from the checkpoint's (" + (
            "; ".join(_difference(old, new, k) for k in data_keys) if data_keys else
            f"same data settings, so the content of {new.get('data.path')!r} or the tokenizer changed") + ")")
    elif saved_fp.get("val_examples") != fingerprint["val_examples"]:
        changed["validation data"] = "; ".join(_change(old, new, k) for k in data_keys) or "its content changed"
    batch_keys = [k for k in differing if k in BATCH_SETTINGS]
    if saved_fp.get("global_batch") != fingerprint["global_batch"]:
        named = "; ".join(_difference(old, new, k) for k in batch_keys) or "another number of processes"
        refused.append(f"global batch: {saved_fp.get('global_batch')} in the checkpoint, "
                       f"{fingerprint['global_batch']} now ({named})")
    else:
        changed.update({k: _change(old, new, k) + " (same global batch)" for k in batch_keys})
    if saved_fp.get("trainable") != fingerprint["trainable"] and not refused:
        refused.append("trainable parameters: this run trains other tensors than the checkpoint holds")
    if refused:
        raise RunError(_refusal(checkpoint, refused))
    return changed


def _refusal(checkpoint: str, reasons: list[str]) -> str:
    return (f"cannot resume {checkpoint}: it was made by a different run ({'; '.join(reasons)}). These cannot "
            "change within a run: resume with the checkpoint's settings, or start a new run (--overwrite, or "
            "another output_dir).")


def _difference(old: dict, new: dict, key: str) -> str:
    return f"{key} is {_show(old.get(key, _MISSING))} in the checkpoint and {_show(new.get(key, _MISSING))} now"


def _change(old: dict, new: dict, key: str) -> str:
    return f"{_show(old.get(key, _MISSING))} -> {_show(new.get(key, _MISSING))}"


def _show(value) -> str:
    return "(not set)" if value is _MISSING else json.dumps(value)


def _as_json(value):
    """As the checkpoint holds it after a JSON round trip (tuples become lists)."""
    return json.loads(json.dumps(value))


def _flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict) or (prefix and not tree):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}.") if isinstance(value, dict) and value else
                    {f"{prefix}{key}": value})
    return flat


# ---- loading -------------------------------------------------------------------------------------
def resume_run(spec: str, cfg: RunConfig, fingerprint: dict, model, state_names: list[str], optimizer, scheduler,
               total_steps: int, ctx: DistContext, hooks=()) -> tuple[dict, dict | None]:
    """Load a checkpoint into the model, optimizer, schedule, training hooks and RNGs; returns (position, meter
    state).

    Settings that take effect are applied over the loaded state: the optimizer's hyperparameters and the
    schedule come from this run's config, the moments (exp_avg, exp_avg_sq) and the step from the checkpoint."""
    directory = ckpt.resolve_checkpoint(spec, cfg.output_dir)
    state = ckpt.read_trainer_state(directory)
    changed = check_resumable(state, cfg, fingerprint, directory)
    step = state["position"]["step"]
    if step > total_steps:
        raise RunError(f"cannot resume {directory}: it is at step {step}, past the end of this run ({total_steps} "
                       "steps from train.max_steps / train.num_epochs). Raise them, or resume an earlier checkpoint.")
    configured = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    live = named_tensors(model, state_names)
    saved, optimizer_state, scheduler_state = ckpt.read_training_state(directory, live.keys())
    for name, param in live.items():
        copy_full_into(param, saved[name])
    load_optimizer_state(model, optimizer, optimizer_state)
    scheduler.load_state_dict(scheduler_state)
    if OPTIMIZER_SETTINGS & changed.keys():
        apply_configured_hyperparameters(optimizer, scheduler, configured)
    ckpt.load_hook_state(directory, hooks)
    ckpt.load_rng_state(directory, ctx.rank)
    if ctx.is_main:
        print(f"resuming from {directory} at step {step}")
        if changed:
            lr = f"; learning rate now {scheduler.get_last_lr()[0]:.3g}" if OPTIMIZER_SETTINGS & changed.keys() else ""
            logger.warning("resuming with changed settings, in effect from step %d: %s%s", step + 1,
                           "; ".join(f"{key} {text}" for key, text in changed.items()), lr)
    return state["position"], state.get("meter")


def apply_configured_hyperparameters(optimizer, scheduler, configured: list[dict]) -> None:
    """Put this run's hyperparameters (from the freshly built optimizer and schedule) over the loaded ones, and
    recompute each group's learning rate at the loaded step with this run's schedule."""
    for group, fresh in zip(optimizer.param_groups, configured, strict=True):
        for key in ("weight_decay", "betas", "eps", "initial_lr"):
            if key in fresh:
                group[key] = fresh[key]
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
