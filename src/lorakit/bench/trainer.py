"""The trainer against the engine: `lorakit train` on real data, and a bare training loop on the same batches.

    lorakit bench trainer --json trainer.json   # ~15-30 min on 2 busy cores: 3 repetitions of each
    lorakit bench trainer --threads 1          # per-CPU-second figures on a shared machine (use these there)
    lorakit bench trainer --quick --model DIR  # a smoke run (a tiny model, 2 x 32 tokens)

Data: real text through the trainer's data pipeline (template, tokenisation, `data.cutoff_len` = --seq, padding
to a multiple of 8, no packing: the trainer's defaults). --data source (the default) writes a text dataset made
from lorakit's own Python source files (they ship in every install; cut deterministically into records of
about 100, 200 and 400 tokens, taking turns, so batches mix cut-off and padded rows); --data demo takes the
demo's smart-home conversations (short: about 60 tokens each); --data FILE any dataset file.

Two measurements, each in a fresh process, taking turns, --repeats times (harness.py):
  trainer  `lorakit train` as a user runs it (`lorakit.cli.main.main(["train", ...])`: progress bar, metrics
           log, checkpoint checks and all) with the default run config apart from the model, the data, the
           LoRA adapter (r, alpha, all-linear), max_steps, batch_size and cutoff_len; precision is the default
           `train.bf16` (read from TrainArgs). Step times come from a timing wrapper around the loop's
           `_train_step` (the trainer's own tokens_per_second is a mean over its 10-step logging window, too
           coarse to drop warm-up steps): the time between the starts of consecutive steps, so each timed step
           includes the loop's own per-step work (metrics, progress bar, logging, the stop-flag check).
  engine   the same model built by the trainer's own setup functions (train/setup.py: prepare_training_model,
           then build_optimizer, build_scheduler) and a bare loop over exactly the same batches
           (the tensors the data pipeline produced, written once to a safetensors file both read): forward and
           loss (summed_token_loss under the trainer's autocast and recompute_saved_tensors), backward, gradient
           clipping, optimizer and schedule step, zero_grad; no logging, no metrics, no host sync.

Both run warm-up + timed + 1 steps (the last step only ends the last timed interval). Tokens are counted the way
the trainer's own tokens/s counts them: input tokens that are not padding (the attention mask's ones); trained
tokens (labels) are reported too. `trainer_vs_engine` = trainer tokens/s over engine tokens/s (medians over the
repetitions; 1.0 = no trainer overhead), also per CPU second (`_cpu_time`), the steadier figure on a shared
machine. Start-up (imports, model load, tokenisation, setup: from the measurement's start to its first step) is
reported separately. Since both build the same model and see the same batches, the engine's loss over each of the
trainer's logging windows must equal the loss the trainer logged (`loss_max_abs_diff`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import tempfile
import time

import yaml

from lorakit.bench import harness
from lorakit.bench.train import add_workload_arguments, resolve

FULL = dict(batch=4, seq=256, steps=8, warmup=2, repeats=3)
QUICK = dict(batch=2, seq=32, steps=2, warmup=1, repeats=1)
ROLES = ("trainer", "engine")
# characters per record of the source dataset, taking turns (about 3.5 characters per token of code)
SOURCE_RECORD_CHARS = (350, 700, 1400)
SOURCE_RECORDS = 400


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_workload_arguments(parser, FULL, quick=QUICK)
    parser.add_argument("--data", default="source", metavar="source|demo|FILE",
                        help="training data: source (text made from lorakit's own source, the default), demo "
                             "(the demo's conversations) or a dataset file")


# ---- the workload: data and run config (parent process) ----------------------------------------------------

def write_source_dataset(path: str, records: int = SOURCE_RECORDS) -> int:
    """A JSON-lines text dataset from lorakit's own Python files (sorted by path): consecutive blank-line-separated
    blocks grouped into records of about SOURCE_RECORD_CHARS characters, taking turns. Returns the record count."""
    import lorakit

    root = os.path.dirname(os.path.abspath(lorakit.__file__))
    files = sorted(os.path.join(d, f) for d, _, names in os.walk(root) for f in names if f.endswith(".py"))
    rows, current = [], ""
    for name in files:
        with open(name, encoding="utf-8") as fh:
            blocks = [b.strip("\n") for b in fh.read().split("\n\n") if b.strip()]
        for block in blocks:
            current = f"{current}\n\n{block}" if current else block
            if len(current) >= SOURCE_RECORD_CHARS[len(rows) % len(SOURCE_RECORD_CHARS)]:
                rows.append({"text": current})
                current = ""
            if len(rows) == records:
                break
        if len(rows) == records:
            break
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in rows)
    return len(rows)


def data_path(choice: str, tmp: str) -> str:
    if choice == "source":
        path = os.path.join(tmp, "source.jsonl")
        write_source_dataset(path)
        return path
    if choice == "demo":
        from importlib import resources

        return str(resources.files("lorakit") / "data" / "demo" / "train.jsonl")
    if not os.path.exists(choice):
        raise ValueError(f"--data {choice!r}: choose source, demo or an existing dataset file")
    return choice


def run_config(args, data: str, output_dir: str, total_steps: int) -> dict:
    """The run config both measurements build: the trainer's defaults but for these fields."""
    return {"model": args.model, "output_dir": output_dir,
            "adapter": {"method": "lora", "r": args.r, "lora_alpha": args.alpha, "target_modules": "all-linear"},
            "data": {"path": data, "cutoff_len": args.seq},
            "train": {"max_steps": total_steps, "batch_size": args.batch, "seed": args.seed}}


def step_batches(cfg, total_steps: int) -> tuple[list[dict], object]:
    """The batches of the first `total_steps` steps of a one-process run of `cfg`, built as the trainer builds
    them (build_datasets, the epoch order of batching.py, the run's collator), and the data's DataInfo."""
    from lorakit.models.loading import load_tokenizer
    from lorakit.train.batching import epoch_batches, micro_batches
    from lorakit.train.data import build_datasets, make_collator

    if cfg.train.gradient_accumulation_steps != 1:
        raise ValueError("the engine loop runs one micro-batch per step")
    tokenizer = load_tokenizer(cfg.model)
    data_log = logging.getLogger("lorakit.train.data")
    level = data_log.level
    data_log.setLevel(logging.ERROR)  # records cut at cutoff_len are expected here: the header line counts them
    try:
        rows, _, info = build_datasets(cfg.data, tokenizer, cfg.task_type)
    finally:
        data_log.setLevel(level)
    collate = make_collator(cfg.data, tokenizer)
    batches, epoch = [], 0
    while len(batches) < total_steps:
        for indices in epoch_batches(len(rows), cfg.train.batch_size, cfg.train.seed, epoch):
            (chunk,) = micro_batches(indices, cfg.train.batch_size)
            batches.append(collate([rows[i] for i in chunk]))
            if len(batches) == total_steps:
                break
        epoch += 1
    return batches, info


def write_batches(path: str, batches: list[dict]) -> None:
    from safetensors.torch import save_file

    save_file({f"{step}.{key}": tensor.contiguous() for step, batch in enumerate(batches)
               for key, tensor in batch.items()}, path)


def read_batches(path: str) -> list[dict]:
    from safetensors.torch import load_file

    batches: dict[int, dict] = {}
    for name, tensor in load_file(path).items():
        step, key = name.split(".", 1)
        batches.setdefault(int(step), {})[key] = tensor
    return [batches[step] for step in sorted(batches)]


def batch_tokens(batch: dict) -> tuple[int, int]:
    """(input tokens that are not padding, trained tokens) of a batch: the trainer's own counts."""
    inputs = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
    return inputs, int((batch["labels"][:, 1:] != -100).sum())


# ---- in the worker process ----------------------------------------------------------------------------------

class StepClock:
    """Wall and CPU time at the start of each step (and once more at the end); the epoch time of the first."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.first_step_at: float | None = None

    def tick(self) -> None:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())
        if self.first_step_at is None:
            self.first_step_at = time.time()

    def intervals(self, first: int, last: int) -> tuple[list[float], list[float]]:
        """Durations of steps first..last-1 (each from its start to the next step's start)."""
        wall = [b - a for a, b in zip(self.wall[first:last], self.wall[first + 1:last + 1])]
        cpu = [b - a for a, b in zip(self.cpu[first:last], self.cpu[first + 1:last + 1])]
        return wall, cpu


def measure(spec: dict) -> dict:
    clock = StepClock()
    if spec["role"] == "trainer":
        extra = _run_trainer(spec, clock)
    elif spec["role"] == "engine":
        extra = _run_engine(spec, clock)
    else:
        raise ValueError(f"unknown role {spec['role']!r}; roles: {ROLES}")
    warmup, steps = spec["warmup"], spec["steps"]
    if len(clock.wall) < warmup + steps + 1:
        raise RuntimeError(f"the {spec['role']} ran {len(clock.wall)} steps, expected {warmup + steps + 1}")
    wall, cpu = clock.intervals(warmup, warmup + steps)
    import torch

    return {"role": spec["role"], "step_seconds": [round(t, 4) for t in wall],
            "cpu_seconds": [round(t, 4) for t in cpu],
            # from the parent starting this process (interpreter, imports, model load, tokenisation, setup)
            "startup_seconds": round(clock.first_step_at - spec["spawned_at"], 2),
            "threads": torch.get_num_threads(), **extra}


def _run_trainer(spec: dict, clock: StepClock) -> dict:
    """`lorakit train CONFIG` in this process, the loop's step function wrapped by the clock."""
    from lorakit.cli.main import main
    from lorakit.train import loop

    step, ends = loop._train_step, []

    def timed_step(*args, **kwargs):
        clock.tick()
        try:
            return step(*args, **kwargs)
        finally:
            ends.append(time.perf_counter())

    loop._train_step = timed_step
    code = main(["train", spec["config_path"], "--overwrite"])
    if code != 0:
        raise RuntimeError(f"lorakit train exited with code {code}")
    clock.tick()  # the last step's end; its interval is not timed
    with open(os.path.join(spec["output_dir"], "metrics.jsonl"), encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    timed = range(spec["warmup"], spec["warmup"] + spec["steps"])
    # the loop's own work between one step function's return and the next one's call (meter, progress bar, log)
    between = [clock.wall[i + 1] - ends[i] for i in timed]
    return {"logged_losses": [[r["step"], r["loss"]] for r in records if "loss" in r],
            "between_steps_seconds": [round(t, 5) for t in between]}


def _run_engine(spec: dict, clock: StepClock) -> dict:
    """The trainer's model, optimizer and schedule (its own setup functions, in its order), then a bare loop."""
    import math

    import torch

    from lorakit.eval.metrics import summed_token_loss
    from lorakit.models.loading import default_device
    from lorakit.ops.recompute import recompute_saved_tensors
    from lorakit.train import precision
    from lorakit.train.config import build_run_config
    from lorakit.train.hooks import RunContext
    from lorakit.train.loop import set_seed
    from lorakit.train.optim import build_optimizer, build_scheduler
    from lorakit.train.setup import load_training_model, prepare_training_model

    with open(spec["config_path"], encoding="utf-8") as fh:
        cfg = build_run_config(yaml.safe_load(fh))
    args, device, total_steps = cfg.train, default_device(), cfg.train.max_steps
    set_seed(args.seed)
    base, _, loaded_dtype = load_training_model(cfg, device)
    if cfg.uses_adapter:  # as the trainer: fields the run decides (AdaLoRA's total_step)
        cfg = dataclasses.replace(cfg, adapter=cfg.adapter.fill_from_run(total_steps))
    set_seed(args.seed)
    prepared = prepare_training_model(base, cfg, device, RunContext(device=device), loaded_dtype)
    model, hooks, bf16 = prepared.model, prepared.hooks, prepared.bf16
    optimizer = build_optimizer(model, args)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for hook in hooks:
        hook.check_run(total_steps)
    scheduler = build_scheduler(optimizer, args, total_steps, hooks)
    for hook in hooks:
        hook.on_train_start(0, optimizer)
    set_seed(args.seed)
    batches = [{k: v.to(device) for k, v in batch.items()} for batch in read_batches(spec["batches_path"])]
    trained = [batch_tokens(batch)[1] for batch in batches]
    autocast, model_config = precision.autocast(device, bf16), model.config
    max_norm = args.max_grad_norm if args.max_grad_norm > 0 else math.inf
    model.train()

    # A function, as the trainer's step: its loss tensor and autograd graph go when it returns. Kept alive into the
    # next step's forward (a bare `for` loop body), the graph's freed pieces interleave with the next step's
    # activations on the heap (runtime.py keeps large blocks off mmap): +600 MB peak RSS at 4 x 256, and the trainer
    # measured 1.05x this loop's speed.
    def step(batch: dict, trained_tokens: int) -> torch.Tensor:
        with autocast, recompute_saved_tensors():
            loss_sum, _ = summed_token_loss(model, batch, config=model_config)
        (loss_sum * (1.0 / max(trained_tokens, 1))).backward()  # the trainer's objective on one process
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return loss_sum.detach()

    losses = []
    for batch, tokens in zip(batches[:total_steps], trained):
        clock.tick()
        losses.append(step(batch, tokens))
    clock.tick()
    return {"losses": [float(loss) / max(n, 1) for loss, n in zip(losses, trained)], "bf16": bf16}


# ---- in the parent process ----------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    resolve(args, FULL, QUICK)
    from lorakit.train.config import TrainArgs, build_run_config

    total_steps = args.warmup + args.steps + 1
    default_bf16 = TrainArgs().bf16
    with tempfile.TemporaryDirectory(prefix="lorakit-bench-") as tmp:
        data = data_path(args.data, tmp)
        raw = run_config(args, data, os.path.join(tmp, "run"), total_steps)
        cfg = build_run_config(raw)
        batches, info = step_batches(cfg, total_steps)
        batches_path = os.path.join(tmp, "batches.safetensors")
        write_batches(batches_path, batches)
        counts = [batch_tokens(b) for b in batches]
        timed = range(args.warmup, args.warmup + args.steps)
        timed_inputs = sum(counts[i][0] for i in timed)
        timed_trained = sum(counts[i][1] for i in timed)
        padded = sum(batches[i]["input_ids"].numel() for i in timed)
        print(f"lorakit bench trainer: {args.model}, LoRA r={args.r} alpha={args.alpha} all-linear, data {args.data} "
              f"({info.num_train} records, {info.truncated_train} cut at {args.seq} tokens), batch {args.batch}, "
              f"train.bf16={default_bf16!r} (the default), {args.warmup} warm-up + {args.steps} timed steps "
              f"({timed_inputs} input tokens, {padded - timed_inputs} padding), {args.repeats} repetition(s) of "
              f"trainer and engine, each in a fresh process; load average {harness.load_average()}", flush=True)
        results: dict[str, list[dict]] = {role: [] for role in ROLES}
        for repeat in range(args.repeats):
            for role in (ROLES if repeat % 2 == 0 else tuple(reversed(ROLES))):
                out = os.path.join(tmp, f"run-{role}-{repeat}")
                config_path = os.path.join(tmp, f"run-{role}-{repeat}.yaml")
                with open(config_path, "w", encoding="utf-8") as fh:
                    yaml.safe_dump({**raw, "output_dir": out}, fh)
                spec = {"kind": "trainer", "role": role, "config_path": config_path, "output_dir": out,
                        "batches_path": batches_path, "warmup": args.warmup, "steps": args.steps,
                        "threads": args.threads, "spawned_at": time.time()}
                result = harness.run_worker(spec)
                result["tokens_per_second"] = round(timed_inputs / sum(result["step_seconds"]), 2)
                result["tokens_per_cpu_second"] = round(timed_inputs / sum(result["cpu_seconds"]), 2)
                results[role].append(result)
                print(f"  run {repeat + 1}: {role:7} {result['tokens_per_second']:8.1f} tokens/s "
                      f"{result['tokens_per_cpu_second']:8.1f} tokens/CPU-s  start-up "
                      f"{result['startup_seconds']:5.1f} s"
                      f"  peak RSS {result['peak_rss_mb']:6.0f} MB  (load {result['load_before']:.1f}"
                      f"->{result['load_after']:.1f})  {harness.probe_label(result.get('machine_probe'))}", flush=True)
    report = summarize(args, results, counts, timed_inputs, timed_trained, padded, default_bf16)
    print()
    print(format_report(report))
    harness.write_json(args.json, report)
    return 0


def summarize(args, results, counts, timed_inputs, timed_trained, padded, default_bf16) -> dict:
    rows = []
    for role in ROLES:
        measured = results[role]
        rows.append({"role": role,
                     "tokens_per_second": harness.median(r["tokens_per_second"] for r in measured),
                     "tokens_per_cpu_second": harness.median(r["tokens_per_cpu_second"] for r in measured),
                     "step_seconds": harness.median(harness.median(r["step_seconds"]) for r in measured),
                     "cpu_seconds": harness.median(harness.median(r["cpu_seconds"]) for r in measured),
                     "startup_seconds": harness.median(r["startup_seconds"] for r in measured),
                     "peak_rss_mb": harness.median(r["peak_rss_mb"] for r in measured),
                     "load_average": harness.median(r["load_before"] for r in measured),
                     "repeats": [{k: r[k] for k in ("tokens_per_second", "tokens_per_cpu_second", "startup_seconds",
                                                    "peak_rss_mb", "load_before", "load_after", "step_seconds",
                                                    "cpu_seconds", "threads")} for r in measured]})
    trainer, engine = rows
    paired = [round(t["tokens_per_cpu_second"] / e["tokens_per_cpu_second"], 3)
              for t, e in zip(results["trainer"], results["engine"])]
    engine_losses = results["engine"][0]["losses"]
    logged = results["trainer"][0]["logged_losses"]
    return {"benchmark": "trainer", "date": time.strftime("%Y-%m-%d %H:%M"),
            "machine": harness.machine(r.get("machine_probe") for measured in results.values() for r in measured),
            "workload": {"model": args.model, "r": args.r, "alpha": args.alpha, "target_modules": "all-linear",
                         "data": args.data, "cutoff_len": args.seq, "batch": args.batch,
                         "train_bf16": default_bf16, "engine_bf16": results["engine"][0]["bf16"],
                         "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "threads": args.threads,
                         "quick": args.quick, "timed_input_tokens": timed_inputs,
                         "timed_trained_tokens": timed_trained, "timed_padding_tokens": padded - timed_inputs,
                         "tokens_counted": "input tokens that are not padding (attention mask), as the trainer's "
                                           "tokens_per_second",
                         "trainer_timing": "timing wrapper around train.loop._train_step: start to next start"},
            "rows": rows,
            "trainer_vs_engine": _ratio(trainer["tokens_per_second"], engine["tokens_per_second"]),
            "trainer_vs_engine_cpu_time": _ratio(trainer["tokens_per_cpu_second"], engine["tokens_per_cpu_second"]),
            "trainer_vs_engine_cpu_time_per_repeat": paired,
            "startup_seconds": {"trainer": trainer["startup_seconds"], "engine": engine["startup_seconds"]},
            # the trainer loop's own work between steps (outside its step function), median per step
            "trainer_between_steps_seconds": harness.median(t for r in results["trainer"]
                                                            for t in r["between_steps_seconds"]),
            "loss_max_abs_diff": loss_difference(logged, engine_losses, counts),
            "trainer_logged_losses": logged}


def loss_difference(logged: list, losses: list[float], counts: list[tuple[int, int]]) -> float | None:
    """Largest difference between the trainer's logged losses (the mean over a logging window, weighted by
    trained tokens) and the engine's over the same windows."""
    if not logged:
        return None
    diffs, start = [], 0
    for step, value in logged:
        window = range(start, step)
        tokens = sum(counts[i][1] for i in window)
        engine = sum(losses[i] * counts[i][1] for i in window) / max(tokens, 1)
        diffs.append(abs(engine - value))
        start = step
    return round(max(diffs), 7)


def _ratio(a, b) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def format_report(report: dict) -> str:
    header = ["measurement", "tokens/s", "tokens/CPU-s", "step s", "CPU s/step", "start-up s", "peak RSS MB", "load"]
    rows = [[r["role"], r["tokens_per_second"], r["tokens_per_cpu_second"], r["step_seconds"], r["cpu_seconds"],
             r["startup_seconds"], r["peak_rss_mb"], r["load_average"]] for r in report["rows"]]
    lines = [harness.table(header, rows)]
    lines.append(f"trainer vs engine: {report['trainer_vs_engine']:.3f}x tokens/s, "
                 f"{report['trainer_vs_engine_cpu_time']:.3f}x per CPU second (per repetition: "
                 f"{', '.join(str(r) for r in report['trainer_vs_engine_cpu_time_per_repeat'])})")
    lines.append(f"start-up (process start to the first step): trainer {report['startup_seconds']['trainer']:.1f} s, "
                 f"engine {report['startup_seconds']['engine']:.1f} s; the trainer loop's work between steps: "
                 f"{report['trainer_between_steps_seconds'] * 1000:.2f} ms a step")
    if report["loss_max_abs_diff"] is not None:
        lines.append(f"largest difference between the trainer's logged losses and the engine's: "
                     f"{report['loss_max_abs_diff']:.2e} (the same model on the same batches)")
    lines.append(harness.probe_report_line(report["machine"]["probe"]))
    return "\n".join(lines)
