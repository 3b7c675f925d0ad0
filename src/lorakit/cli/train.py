"""Fine-tune a model as a YAML run config says, with key=value overrides.

    lorakit train run.yaml
    lorakit train run.yaml train.learning_rate=1e-4 train.max_steps=200 output_dir=runs/lr1e-4
    torchrun --nproc_per_node=2 -m lorakit train run.yaml          # data parallel (only rank 0 prints)

A run config (see lorakit.train.config):

    model: smollm2
    adapter: {method: lora, r: 8, lora_alpha: 16, target_modules: all-linear}
    data: {path: data/train.jsonl, val_size: 0.1}
    train: {learning_rate: 2.0e-4, num_epochs: 3, batch_size: 8}
    output_dir: runs/my-run

Overrides use dotted keys and YAML values (numbers, booleans, lists): data.cutoff_len=256. The run writes
into output_dir: adapter/ (model/ for finetuning_type full or freeze), metrics.jsonl, loss_curve.png,
train_results.json, run_config.yaml and checkpoints. An earlier run there is replaced only with --overwrite,
and only once the new run has saved its first checkpoint (or its final adapter): until then it is kept aside in
output_dir/.previous-run/ and put back if the new run fails or is killed. One run at a time per output_dir (a
lock file, .lorakit.lock, names the run holding it). --dry-run shows the data as `lorakit data` does.
Ctrl-C finishes the current step, saves a checkpoint and exits with code 130; continue the run with
train.resume_from_checkpoint=latest.
"""

from __future__ import annotations

import argparse
import os

from lorakit.cli.common import is_main_process

METRIC_ORDER = ("loss", "perplexity", "accuracy", "rouge1", "rouge2", "rougeL", "rougeLsum", "exact_match")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", help="the YAML run config")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override config values, e.g. train.learning_rate=1e-4 output_dir=runs/b")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier run in output_dir (without it, an existing run is an error)")
    parser.add_argument("--no-progress", action="store_true", help="hide the training progress bar")
    parser.add_argument("--dry-run", action="store_true",
                        help="only show how the data will be trained on (as `lorakit data`), then stop")


def run(args: argparse.Namespace) -> int:
    from lorakit.train.config import load_run_config
    from lorakit.train.loop import run_training
    from lorakit.train.runtime import allocator_name

    cfg = load_run_config(args.config, args.overrides)
    main = is_main_process()
    if args.dry_run:
        from lorakit.cli.data import data_report

        if main:
            print(data_report(cfg.data, cfg.model, cfg.task_type,
                              (cfg.train.batch_size, cfg.train.gradient_accumulation_steps)))
        return 0
    if main:
        print(f"training {cfg.model} ({cfg.finetuning_type}) on {cfg.data.path} -> {cfg.output_dir} "
              f"(malloc: {allocator_name()})", flush=True)  # chosen at startup (cli/startup.py)
    result = run_training(cfg, overwrite=args.overwrite, show_progress=not args.no_progress, return_model=False)
    if not main:
        return 130 if result.interrupted else 0
    if result.interrupted:
        print_interrupted(result, args)
        return 130
    print_summary(result, cfg)
    return 0


def print_summary(result, cfg) -> None:
    loss = "n/a" if result.train_loss is None else f"{result.train_loss:.4f}"
    print(f"done: {result.steps} steps in {format_seconds(result.train_seconds)}, final train loss {loss}")
    if result.metrics:
        print("validation: " + " | ".join(f"{name} {format_metric(name, value)}"
                                          for name, value in ordered_metrics(result.metrics)))
    print(f"trainable params: {result.trainable_params:,d} of {result.total_params:,d} "
          f"({result.trainable_percent:.4f}%)")
    saved = "adapter" if cfg.uses_adapter else "model"
    print(f"{saved} saved to {os.path.join(cfg.output_dir, saved)} (metrics.jsonl, loss_curve.png, "
          f"train_results.json in {cfg.output_dir})")


def print_interrupted(result, args: argparse.Namespace) -> None:
    from lorakit.train.checkpoint import list_checkpoints

    found = list_checkpoints(result.output_dir)
    where = found[-1] if found else result.output_dir
    again = " ".join(["lorakit train", args.config, *[a for a in args.overrides
                                                      if not a.startswith("train.resume_from_checkpoint=")]])
    print(f"interrupted after {result.steps} steps; checkpoint saved in {where}")
    print(f"continue with: {again} train.resume_from_checkpoint=latest")


def ordered_metrics(metrics: dict) -> list[tuple[str, float]]:
    known = [(name, metrics[name]) for name in METRIC_ORDER if name in metrics]
    return known + [(k, v) for k, v in metrics.items() if k not in METRIC_ORDER and k != "generated"]


def format_metric(name: str, value) -> str:
    if not isinstance(value, (int, float)):
        return str(value)
    return f"{value:.2f}" if name == "perplexity" else f"{value:.4f}"


def format_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"
