"""The training loop, written out in full.

    result = run_training(load_run_config("run.yaml"))

One optimizer step = one global batch (see batching.py). The loss of a step is the mean over every
trained token of the global batch, whatever the number of processes or micro-batches, so a run on two
processes matches a run on one with the same global batch. Checkpoints (checkpoint.py) restore the
model, optimizer, schedule, RNGs and data position, so a resumed run matches an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import signal
import threading
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from lorakit.adapter_files import RUN_ADAPTER_SUBDIR, RUN_MODEL_SUBDIR
from lorakit.atomic import disk_full_says, replace_directory, tensor_bytes
from lorakit.config import write_json_atomic
from lorakit.eval.metrics import summed_token_loss
from lorakit.integrations.model_card import write_run_card
from lorakit.label_names import write_label_names
from lorakit.model import parameter_counts
from lorakit.ops.attention import restore_attention
from lorakit.ops.fused_modules import restore_modules
from lorakit.ops.recompute import recompute_saved_tensors
from lorakit.train import checkpoint as ckpt
from lorakit.train import precision
from lorakit.train.batching import epoch_batches, micro_batches, process_share, steps_per_epoch, trained_tokens
from lorakit.train.config import RunConfig
from lorakit.train.data import build_datasets, load_splits, make_collator
from lorakit.train.distributed import (
    DistContext, full_tensor, init_distributed, optimizer_state, shutdown_distributed, wrap_model,
)
from lorakit.train.evaluate import evaluate_model
from lorakit.train.hooks import RunContext
from lorakit.train.meter import RunMeter
from lorakit.train.optim import build_optimizer, build_scheduler
from lorakit.train.output_dir import claim_output_dir, drop_previous_run, set_aside_previous_run
from lorakit.train.resume import resume_run, run_fingerprint, weights_hash
from lorakit.train.run_log import MetricsLog, peak_rss_mb, plot_loss_curve
from lorakit.train.setup import (
    RunError, load_training_model, named_tensors, prepare_training_model, trainable_tensors, transformer_blocks,
)
from lorakit.train.threads import ThreadSetting


@dataclass
class Position:
    """Where the run is: optimizer steps done, and the next global batch (epoch, index in epoch)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


@dataclass
class TrainResult:
    output_dir: str
    # the trained model: a PeftModel for adapter runs, the merged model when training hooks changed base weights;
    # in the dtype it was loaded in, its frozen weights holding the bf16 values a bf16 run trained against;
    # None when run_training was called with return_model=False
    model: torch.nn.Module | None
    tokenizer: object
    steps: int
    train_seconds: float
    train_loss: float | None
    trainable_params: int
    total_params: int
    metrics: dict = field(default_factory=dict)  # final evaluation
    interrupted: bool = False

    @property
    def trainable_percent(self) -> float:
        return 100 * self.trainable_params / self.total_params


def run_training(cfg: RunConfig, overwrite: bool = False, loaded=None, show_progress: bool = True,
                 return_model: bool = True) -> TrainResult:
    """Train as `cfg` says. `loaded` = (model, tokenizer) already in memory (e.g. the demo's). return_model=False:
    the caller does not use result.model (None then; `lorakit train`), so the run does not give the frozen weights
    their loaded dtype back at the end: for a bf16 checkpoint loaded as stored that would build the fp32 model
    (a 1.2B model: 4.9 GB, above its training step's peak)."""
    ctx = init_distributed()
    try:
        # locked output directory (refused at once if it holds a run); the CPU threads, restored on return
        with claim_output_dir(cfg, overwrite, ctx.is_main), ThreadSetting(cfg.train.threads, ctx.device) as threads:
            if threads.reason and ctx.is_main:
                print(f"threads: {threads.threads} per process ({threads.reason})", flush=True)
            return _train(cfg, ctx, overwrite, loaded, show_progress, return_model)
    finally:
        shutdown_distributed(ctx)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _train(cfg: RunConfig, ctx: DistContext, overwrite: bool, loaded, show_progress: bool,
           return_model: bool) -> TrainResult:
    args, out = cfg.train, cfg.output_dir
    set_seed(args.seed)
    loaded_dtype = None  # torch.float32 when a bf16 checkpoint's weights were kept as stored (setup.py)
    if loaded is None:
        labels = load_splits(cfg.data).label_names if cfg.task_type == "SEQ_CLS" else None
        *loaded, loaded_dtype = load_training_model(cfg, ctx.device, labels)
    base_model, tokenizer = loaded
    model_weights = weights_hash(base_model, loaded_dtype)  # before the adapter goes in: the base model, by content
    train_rows, val_rows, info = build_datasets(cfg.data, tokenizer, cfg.task_type)
    collate = make_collator(cfg.data, tokenizer)

    global_batch = args.batch_size * args.gradient_accumulation_steps * ctx.world_size
    per_epoch = steps_per_epoch(len(train_rows), global_batch)
    total_steps = args.max_steps or math.ceil(per_epoch * args.num_epochs)
    if cfg.uses_adapter:  # fields the run decides (AdaLoRA's total_step), recorded in run_config.yaml and the adapter
        cfg = dataclasses.replace(cfg, adapter=cfg.adapter.fill_from_run(total_steps))

    resume_dir = ckpt.resolve_checkpoint(args.resume_from_checkpoint, out) if args.resume_from_checkpoint else None
    run = RunContext(rows=train_rows, collate=collate, device=ctx.device, rank=ctx.rank, world_size=ctx.world_size,
                     resumed_state=ckpt.read_hook_state(resume_dir) if resume_dir else {})
    set_seed(args.seed)  # the adapter's initialisation depends on the seed only
    # the adapter, activation checkpointing, the hooks set up, then precision: frozen weights in bf16 until the run
    # ends (after the adapter's init: PiSSA's residual is computed in fp32; those hooks rewrite stay fp32) and the
    # fused modules (setup.py)
    prepared = prepare_training_model(base_model, cfg, ctx.device, run, loaded_dtype)
    model, hooks, state_names = prepared.model, prepared.hooks, prepared.state_names
    bf16, stored_in_bf16 = prepared.bf16, prepared.stored_in_bf16
    merge_result = cfg.uses_adapter and any(hook.changed_base_parameters() for hook in hooks)
    trainable_params = sum(t.numel() for t in trainable_tensors(model).values())
    total_params = parameter_counts(model)[1]
    blocks = transformer_blocks(model) if args.distributed == "fsdp" else None
    wrapped = wrap_model(model, ctx, args.distributed, blocks)
    optimizer = build_optimizer(model, args)
    params = [p for group in optimizer.param_groups for p in group["params"]]  # after sharding: the live ones

    for hook in hooks:
        hook.check_run(total_steps)
    scheduler = build_scheduler(optimizer, args, total_steps, hooks)
    fingerprint = run_fingerprint(model_weights, named_tensors(model, state_names), train_rows, val_rows,
                                  info.label_names, global_batch)
    set_aside_previous_run(cfg, overwrite, ctx.is_main)  # the inputs proved good: the earlier run steps aside
    ctx.barrier()
    position, meter = Position(), RunMeter()
    if resume_dir:
        saved_position, saved_meter = resume_run(resume_dir, cfg, fingerprint, model, state_names, optimizer,
                                                 scheduler, total_steps, ctx, hooks)
        position, meter = Position(**saved_position), RunMeter.from_state(saved_meter)
    for hook in hooks:
        hook.on_train_start(position.step, optimizer)
    if not resume_dir:
        set_seed(args.seed + ctx.rank)  # each process its own dropout stream; a resume restores the saved ones
    log = MetricsLog(os.path.join(out, "metrics.jsonl"), position.step if args.resume_from_checkpoint else None)
    if ctx.is_main:
        _write_run_config(cfg)

    model_config = getattr(model, "config", None)
    autocast = precision.autocast(ctx.device, bf16)
    bar = tqdm(total=total_steps, initial=position.step, unit="step", dynamic_ncols=True,
               disable=not (ctx.is_main and show_progress))
    interrupted = False
    wrapped.train()
    with _StopOnCtrlC() as stop:
        while position.step < total_steps and not interrupted:
            batches = epoch_batches(len(train_rows), global_batch, args.seed, position.epoch)
            while position.batch_in_epoch < len(batches) and position.step < total_steps:
                indices = batches[position.batch_in_epoch]
                loss, tokens, inputs, grad_norm = _train_step(
                    wrapped, params, model_config, train_rows, indices, collate, optimizer, scheduler, args, ctx,
                    autocast, hooks, position.step)
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    raise RunError(_diverged_message(loss, grad_norm, position.step + 1, out, args.learning_rate))
                position.step += 1
                position.batch_in_epoch += 1
                meter.add(loss, tokens, inputs)
                speed = meter.speed()
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", tok_s=f"{speed:.0f}")
                if position.step % args.logging_steps == 0 or position.step == total_steps:
                    train_loss = meter.close_window()
                    if ctx.is_main:
                        log.write({"step": position.step, "epoch": round(position.step / per_epoch, 4),
                                   "loss": train_loss, "lr": scheduler.get_last_lr()[0],
                                   "grad_norm": grad_norm, "tokens_per_second": speed})
                if args.eval_steps and position.step % args.eval_steps == 0 and val_rows:
                    _log_eval(model, tokenizer, val_rows, collate, cfg, ctx, log, position.step, autocast)
                    wrapped.train()
                # read once per step, after it (a Ctrl-C during step k stops after step k), on every process
                interrupted = ctx.any_flag(stop.requested)
                if interrupted or (args.save_steps and position.step % args.save_steps == 0):
                    _save_checkpoint(model, state_names, optimizer, scheduler, hooks, position, fingerprint, meter,
                                     info, cfg, ctx)
                if interrupted:
                    break
            else:
                position.epoch += 1
                position.batch_in_epoch = 0
    bar.close()
    restore_modules(model)  # the model handed back runs its own forwards (the fused ones compute the same)
    restore_attention(model)  # and its own attention implementation
    result = TrainResult(out, model, tokenizer, position.step, meter.train_seconds(), meter.train_loss,
                         trainable_params, total_params, interrupted=interrupted)
    # The returned model holds its frozen weights in the dtype they were loaded in (with the bf16 values trained
    # against): usable without autocast, merged in fp32 and saved in one dtype (precision.py). The final
    # evaluation of an adapter still runs on the bf16 copies (no cast per use).
    if merge_result or (interrupted and return_model):
        precision.restore_stored_dtypes(model, stored_in_bf16)
    if interrupted:
        if not return_model:
            result.model = None
        return result
    # saved before the final evaluation, so a failing evaluation never costs the trained weights
    result.model = _save_final_model(result.model, cfg, tokenizer, ctx, merge_result, info.label_names)
    if val_rows:
        result.metrics = _log_eval(result.model, tokenizer, val_rows, collate, cfg, ctx, log, position.step,
                                   autocast, final=True)
    if return_model:
        precision.restore_stored_dtypes(model, stored_in_bf16)  # nothing left to do when restored above
    else:
        result.model = None
    if ctx.is_main:
        _write_final(result, cfg, log, merge_result)
    ctx.barrier()
    return result


def _train_step(wrapped, params, model_config, rows, indices, collate, optimizer, scheduler, args, ctx, autocast,
                hooks, steps_done):
    """One optimizer step on a global batch. Returns (mean loss, trained tokens, input tokens, grad norm).
    `hooks` are called as training_hooks.py describes; `steps_done` counts the steps before this one. The loss
    stays on the device until the step's end: one host sync per step, and one all-reduce (loss and input tokens
    together) when there are several processes. (Ctrl-C is read by the caller after the step.)"""
    total_tokens = sum(trained_tokens(rows[i]) for i in indices)
    share = process_share(indices, ctx.rank, ctx.world_size)
    # A process with no rows (a short last batch) still runs forward/backward, scaled by 0, to stay in sync.
    chunks, weight = (micro_batches(share, args.batch_size), 1.0) if share else ([indices[:1]], 0.0)
    local_loss, local_inputs = None, 0
    for j, chunk in enumerate(chunks):
        host_batch = collate([rows[i] for i in chunk])
        local_inputs += int(host_batch["attention_mask"].sum()) if "attention_mask" in host_batch \
            else host_batch["input_ids"].numel()
        batch = {k: v.to(ctx.device, non_blocking=True) for k, v in host_batch.items()}
        sync = j == len(chunks) - 1
        no_sync = wrapped.no_sync() if ctx.enabled and not sync and hasattr(wrapped, "no_sync") else \
            contextlib.nullcontext()
        with no_sync:
            with autocast, recompute_saved_tensors():
                loss_sum, _ = summed_token_loss(wrapped, batch, config=model_config)
            # DDP averages gradients over processes; scaling by world_size / tokens gives the global mean.
            objective = loss_sum * (weight * ctx.world_size / max(total_tokens, 1))
            extra = [term for term in (hook.extra_loss(wrapped) for hook in hooks) if term is not None]
            if extra:  # once per step in total: each micro-batch adds its share of the step's tokens
                share = sum(trained_tokens(rows[i]) for i in chunk) / max(total_tokens, 1)
                objective = objective + sum(extra) * (weight * ctx.world_size * share)
            objective.backward()
        term = loss_sum.detach().double() * weight
        local_loss = term if local_loss is None else local_loss + term
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm if args.max_grad_norm > 0 else math.inf)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    sums = torch.stack([local_loss.to(ctx.device), torch.tensor(float(local_inputs), dtype=torch.float64,
                        device=ctx.device)])
    summed_loss, inputs = ctx.sum_tensor(sums).tolist()
    loss, grad_norm = summed_loss / max(total_tokens, 1), float(grad_norm)
    if math.isfinite(loss) and math.isfinite(grad_norm):
        for hook in hooks:
            hook.before_optimizer_step(steps_done)
        optimizer.step()
        scheduler.step()
        for hook in hooks:
            hook.after_optimizer_step(steps_done + 1)
        optimizer.zero_grad(set_to_none=True)
        for hook in hooks:
            hook.on_step_end(steps_done + 1, optimizer)
    else:
        optimizer.zero_grad(set_to_none=True)
    return loss, total_tokens, int(inputs), grad_norm


def _log_eval(model, tokenizer, val_rows, collate, cfg, ctx, log, step, autocast, final=False) -> dict:
    with autocast:  # the precision of training (bf16 frozen weights need it)
        metrics = evaluate_model(model, tokenizer, val_rows, collate, cfg, ctx, with_generation=final)
    if ctx.is_main and metrics:
        log.write({"step": step, **{f"eval_{k}": v for k, v in metrics.items()}})
    return metrics


def _write_run_config(cfg: RunConfig) -> None:
    """run_config.yaml, written through a temporary file: the run as it is being trained."""
    path = os.path.join(cfg.output_dir, "run_config.yaml")
    with disk_full_says("run_config.yaml", cfg.output_dir, cleanup=[f"{path}.tmp"]):
        with open(f"{path}.tmp", "w", encoding="utf-8") as fh:
            yaml.safe_dump(cfg.to_dict(), fh, sort_keys=False)
        os.replace(f"{path}.tmp", path)


def _save_checkpoint(model, state_names, optimizer, scheduler, hooks, position, fingerprint, meter, info, cfg,
                     ctx) -> None:
    """Every process joins (sharded tensors are gathered, each writes its RNG); rank 0 writes the rest."""
    out, step = cfg.output_dir, position.step
    temp = ckpt.temp_dir_for(out, step) if ctx.is_main else os.path.join(out, f"checkpoint-{step}.tmp")
    ctx.barrier()
    trainable = {name: full_tensor(t) for name, t in named_tensors(model, state_names).items()}
    optimizer_dict = optimizer_state(model, optimizer)
    needed = tensor_bytes(trainable) * (2 if cfg.uses_adapter else 1) + tensor_bytes(
        [v for values in optimizer_dict["state"].values() for v in values.values() if isinstance(v, torch.Tensor)])
    found = ckpt.list_checkpoints(out)
    intact = f"The last complete checkpoint, {found[-1]}, is intact." if found else "No checkpoint was saved yet."
    with disk_full_says(f"checkpoint-{step}", out, needed, cleanup=[temp], advice=intact):
        os.makedirs(temp, exist_ok=True)
        ckpt.write_rng_state(temp, ctx.rank)
        if cfg.uses_adapter:
            model.save_pretrained(temp, is_main_process=ctx.is_main)
        if ctx.is_main:
            if info.label_names:
                write_label_names(temp, info.label_names)
            state = {"position": asdict(position), "fingerprint": fingerprint, "output_dir": out,
                     "config": cfg.to_dict(), "meter": meter.state()}
            ckpt.write_training_state(temp, trainable, optimizer_dict, scheduler.state_dict(), state)
            ckpt.write_hook_state(temp, hooks)
        ctx.barrier()
        if ctx.is_main:
            ckpt.publish(temp, out, step, cfg.train.save_total_limit)
            drop_previous_run(out)  # an --overwrite's earlier run: replaced by a complete checkpoint
    ctx.barrier()


def _final_model_dir(cfg: RunConfig, merge_result: bool = False) -> str:
    adapter_only = cfg.uses_adapter and not merge_result
    return os.path.join(cfg.output_dir, RUN_ADAPTER_SUBDIR if adapter_only else RUN_MODEL_SUBDIR)


def _save_final_model(model, cfg: RunConfig, tokenizer, ctx: DistContext, merge_result: bool, label_names=None):
    """On every process (a sharded adapter is gathered); rank 0 writes, into a temporary directory renamed into
    place when complete. Returns the model to evaluate.

    merge_result: training hooks changed the base weights (changed_base_parameters), so the adapter alone no
    longer reproduces the trained model: the adapter is merged and the whole model saved (and returned)."""
    if merge_result:
        model = model.merge_and_unload()
    final = _final_model_dir(cfg, merge_result)
    temp = f"{final}.tmp-{os.getpid()}"
    found = ckpt.list_checkpoints(cfg.output_dir)
    weights = trainable_tensors(model) if cfg.uses_adapter and not merge_result else model.state_dict()
    advice = (f"The trained weights are in the last checkpoint, {found[-1]}: once there is space, finish with "
              "train.resume_from_checkpoint=latest." if found else
              "No checkpoint holds this run's weights (train.save_steps is 0), so the run must be trained again.")
    with disk_full_says(f"the final {os.path.basename(final)}", cfg.output_dir, tensor_bytes(weights),
                        cleanup=[temp], advice=advice):
        model.save_pretrained(temp, is_main_process=ctx.is_main)
        if ctx.is_main:
            tokenizer.save_pretrained(temp)
            if label_names:
                write_label_names(temp, label_names)
            replace_directory(temp, final)
            drop_previous_run(cfg.output_dir)
    return model


def _write_final(result: TrainResult, cfg: RunConfig, log: MetricsLog, merge_result: bool) -> None:
    out, target = cfg.output_dir, _final_model_dir(cfg, merge_result)
    summary = {
        "steps": result.steps, "train_seconds": round(result.train_seconds, 2), "train_loss": result.train_loss,
        "trainable_params": result.trainable_params, "total_params": result.total_params,
        "trainable_percent": round(result.trainable_percent, 4), "peak_rss_mb": round(peak_rss_mb(), 1),
        "eval": result.metrics, "saved_to": target,
    }
    with disk_full_says("train_results.json and loss_curve.png", out, advice=f"The {os.path.basename(target)} is "
                        f"saved in {target}."):
        write_json_atomic(os.path.join(out, "train_results.json"), summary)
        if os.path.basename(target) == RUN_ADAPTER_SUBDIR:  # the adapter's model card, now with the final metrics
            write_run_card(target)
        plot_loss_curve(log.records(), os.path.join(out, "loss_curve.png"))


def _diverged_message(loss, grad_norm, step, out, lr) -> str:
    found = ckpt.list_checkpoints(out)
    last = found[-1] if found else "none (set train.save_steps to keep checkpoints)"
    return (f"training diverged at step {step}: loss={loss}, grad_norm={grad_norm}. The step was not applied; the "
            f"last good checkpoint is {last}. Lower train.learning_rate (now {lr}), keep train.max_grad_norm > 0, "
            "or check the data.")


class _StopOnCtrlC:
    """First Ctrl-C: finish the current step, save a checkpoint, stop. Second Ctrl-C: abort at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: finishing this step and saving a checkpoint (press Ctrl-C again to abort now)", flush=True)

    def __enter__(self) -> "_StopOnCtrlC":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
