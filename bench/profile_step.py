"""Where the time of one training step goes: the `lorakit bench train` workload under torch.profiler.

    PYTHONPATH=src python bench/profile_step.py --library lorakit --setting default
    PYTHONPATH=src python bench/profile_step.py --library peft --setting bf16 --batch 1 --seq 256

Builds the step exactly as `lorakit bench train` does (lorakit.bench.workload.TrainingStep), runs --warmup
untimed steps, then profiles --steps steps and prints the self CPU time per group of operators (matmuls,
attention, cross-entropy, optimizer, elementwise, copies and casts) and the top operators. docs/performance.md
quotes its output. A profile, not a timing: the profiler's own overhead is in the total.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from lorakit.bench.workload import SETTINGS, TrainingStep, random_batch

# operator-name fragment -> group; the first match wins
GROUPS = (
    ("linear_pointwise", "matmul"), ("mkldnn", "matmul"), ("::mm", "matmul"), ("addmm", "matmul"),
    ("bmm", "matmul"), ("matmul", "matmul"), ("linear", "matmul"),
    ("attention", "attention"), ("softmax", "softmax / log-softmax / cross-entropy"),
    ("nll_loss", "softmax / log-softmax / cross-entropy"), ("cross_entropy", "softmax / log-softmax / cross-entropy"),
    ("logsumexp", "softmax / log-softmax / cross-entropy"),
    ("_foreach", "optimizer"), ("adam", "optimizer"),
    ("copy_", "copies and casts"), ("to_copy", "copies and casts"), ("contiguous", "copies and casts"),
    ("clone", "copies and casts"), ("cat", "copies and casts"),
    ("fill_", "allocation and zeroing"), ("zero", "allocation and zeroing"), ("empty", "allocation and zeroing"),
)


def group_of(name: str) -> str:
    lowered = name.lower()
    return next((group for fragment, group in GROUPS if fragment in lowered), "elementwise and other")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--library", default="lorakit", choices=("lorakit", "peft"))
    parser.add_argument("--setting", default="default", choices=SETTINGS)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    run = TrainingStep(args.library, args.setting, args.model, 16, 32, 2e-4, None)
    for step in range(args.warmup):
        run.step(random_batch(step, args.batch, args.seq, run.vocab, 0))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for step in range(args.steps):
            run.step(random_batch(args.warmup + step, args.batch, args.seq, run.vocab, 0))
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    groups: dict[str, float] = defaultdict(float)
    for event in events:
        groups[group_of(event.key)] += event.self_cpu_time_total
    print(f"{args.library} {args.setting}: {args.batch} x {args.seq} tokens, {args.threads} thread(s); "
          f"self CPU time per step {total / args.steps / 1e6:.2f} s")
    for group, micros in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {group:40} {micros / args.steps / 1e6:7.2f} s  {100 * micros / total:5.1f}%")
    print("top operators:")
    for event in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]:
        print(f"  {event.key:50} {event.self_cpu_time_total / args.steps / 1e6:7.2f} s  {event.count // args.steps:6d} "
              f"calls  {100 * event.self_cpu_time_total / total:5.1f}%")


if __name__ == "__main__":
    main()
