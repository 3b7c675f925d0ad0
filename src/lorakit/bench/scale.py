"""How training speed scales: tokens/s over sequence lengths (tokens per step held constant) and batch sizes.

    lorakit bench scale --json scale.json      # lengths 128..2048 at 2,048 tokens a step; batches 1,4,8,16 x 256
    lorakit bench scale --quick                # a smoke run

The workload of `lorakit bench train` (SmolLM2-135M, LoRA r=16 all-linear, AdamW) at lorakit's default setting
(--setting to change it). A step's cost should grow linearly with its tokens: tokens/s flat over the lengths
(apart from attention, whose cost per token grows with the length) and over the batch sizes. Every point runs in
a fresh process, the points take turns, medians of --repeats runs; each row shows its tokens/s relative to the
first row of its sweep.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from lorakit.bench import harness
from lorakit.bench.train import add_workload_arguments, resolve
from lorakit.bench.workload import SETTINGS, write_initial_adapter

FULL = dict(seq=256, steps=3, warmup=1, repeats=2)
LENGTHS, TOKENS_PER_STEP, BATCHES = (128, 256, 512, 1024, 2048), 2048, (1, 4, 8, 16)
QUICK_LENGTHS, QUICK_TOKENS, QUICK_BATCHES = (32, 64), 64, (1, 2)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_workload_arguments(parser, FULL, batch_option=False)
    parser.add_argument("--setting", default="default", choices=SETTINGS, help="lorakit setting (default: default)")
    parser.add_argument("--lengths", default=None, metavar="L,L",
                        help=f"sequence lengths (default {','.join(map(str, LENGTHS))})")
    parser.add_argument("--tokens-per-step", type=int, default=None,
                        help=f"batch x length in the length sweep (default {TOKENS_PER_STEP})")
    parser.add_argument("--batches", default=None, metavar="B,B",
                        help=f"batch sizes at --seq tokens (default {','.join(map(str, BATCHES))})")
    parser.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (default 2e-4)")


def _ints(value: str | None, default: tuple[int, ...], option: str) -> list[int]:
    if value is None:
        return list(default)
    try:
        items = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        items = []
    if not items or min(items) < 1:
        raise ValueError(f"{option} {value!r}: give positive integers separated by commas")
    return items


def points(args) -> list[tuple[str, int, int]]:
    """(sweep, batch, seq) of every measurement."""
    lengths = _ints(args.lengths, QUICK_LENGTHS if args.quick else LENGTHS, "--lengths")
    tokens = args.tokens_per_step or (QUICK_TOKENS if args.quick else TOKENS_PER_STEP)
    for length in lengths:
        if tokens % length:
            raise ValueError(f"--tokens-per-step {tokens} is not a multiple of the length {length}")
    batches = _ints(args.batches, QUICK_BATCHES if args.quick else BATCHES, "--batches")
    seq = args.seq
    return [("length", tokens // n, n) for n in lengths] + [("batch", b, seq) for b in batches]


def run(args: argparse.Namespace) -> int:
    resolve(args, FULL)
    todo = points(args)
    distinct = len({(batch, seq) for _, batch, seq in todo})
    print(f"lorakit bench scale: {args.model}, LoRA r={args.r} all-linear, setting {args.setting}, {args.warmup} "
          f"warm-up + {args.steps} timed steps, {args.repeats} repetition(s) of {distinct} shapes, each in a fresh "
          f"process; load average {harness.load_average()}", flush=True)
    shapes = list(dict.fromkeys((batch, seq) for _, batch, seq in todo))  # a shape in both sweeps runs once
    results: dict[tuple, list[dict]] = {shape: [] for shape in shapes}
    with tempfile.TemporaryDirectory(prefix="lorakit-bench-") as tmp:
        init_path = os.path.join(tmp, "init.safetensors")
        write_initial_adapter(init_path, args.model, args.r, args.alpha, args.seed)
        for repeat in range(args.repeats):
            for batch, seq in (shapes if repeat % 2 == 0 else list(reversed(shapes))):
                spec = {"kind": "train", "library": "lorakit", "setting": args.setting, "variant": "lora",
                        "model": args.model, "batch": batch, "seq": seq, "r": args.r, "alpha": args.alpha,
                        "lr": args.lr, "steps": args.steps, "warmup": args.warmup, "seed": args.seed,
                        "threads": args.threads, "init_path": init_path}
                result = harness.run_worker(spec)
                results[(batch, seq)].append(result)
                print(f"  run {repeat + 1}: batch {batch:3} x {seq:5}: {result['tokens_per_second']:8.1f} "
                      f"tokens/s  peak RSS {result['peak_rss_mb']:6.0f} MB  (load {result['load_before']:.1f})  "
                      f"{harness.probe_label(result.get('machine_probe'))}", flush=True)
    rows = []
    for sweep in ("length", "batch"):
        first = first_cpu = None
        for point in (p for p in todo if p[0] == sweep):
            measured = results[point[1:]]
            speed = harness.median(r["tokens_per_second"] for r in measured)
            first = first or speed
            cpu_speed = harness.median(point[1] * point[2] / harness.median(r["cpu_seconds"]) for r in measured)
            first_cpu = first_cpu or cpu_speed
            rows.append({"sweep": sweep, "batch": point[1], "seq": point[2], "tokens_per_step": point[1] * point[2],
                         "tokens_per_second": speed, "relative": round(speed / first, 3),
                         # per second of the process's CPU time: steadier than the wall clock on a shared machine
                         "tokens_per_cpu_second": round(cpu_speed, 2), "relative_cpu": round(cpu_speed / first_cpu, 3),
                         "peak_rss_mb": harness.median(r["peak_rss_mb"] for r in measured),
                         "load_average": harness.median(r["load_before"] for r in measured)})
    spread = {s: round(min(r["relative"] for r in rows if r["sweep"] == s) /
                       max(r["relative"] for r in rows if r["sweep"] == s), 3) for s in ("length", "batch")}
    spread_cpu = {s: round(min(r["relative_cpu"] for r in rows if r["sweep"] == s) /
                           max(r["relative_cpu"] for r in rows if r["sweep"] == s), 3) for s in ("length", "batch")}
    report = {"benchmark": "scale", "date": time.strftime("%Y-%m-%d %H:%M"),
              "machine": harness.machine(r.get("machine_probe") for measured in results.values() for r in measured),
              "workload": {"model": args.model, "r": args.r, "alpha": args.alpha, "setting": args.setting,
                           "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "quick": args.quick},
              "rows": rows, "slowest_over_fastest": spread,
              "slowest_over_fastest_cpu": spread_cpu}
    print()
    print(harness.table(["sweep", "batch", "seq", "tokens/s", "relative", "tokens/CPU-s", "relative", "peak RSS MB",
                         "load"],
                        [[r["sweep"], r["batch"], r["seq"], r["tokens_per_second"], r["relative"],
                          r["tokens_per_cpu_second"], r["relative_cpu"], r["peak_rss_mb"], r["load_average"]]
                         for r in rows]))
    print(f"slowest / fastest point: lengths {spread['length']}, batches {spread['batch']} (per CPU second: "
          f"lengths {spread_cpu['length']}, batches {spread_cpu['batch']})")
    print(harness.probe_report_line(report["machine"]["probe"]))
    harness.write_json(args.json, report)
    return 0
