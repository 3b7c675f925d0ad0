"""Benchmarks: lorakit against the obvious alternative on this machine, printed as ratios.

    lorakit bench train --json out.json  # training step vs HuggingFace PEFT: speed, memory, loss curves
    lorakit bench infer                  # inference latency: base / merged / unmerged / mixed batch of 8 adapters
    lorakit bench trainer                # `lorakit train` on real data vs a bare loop on the same batches
    lorakit bench scale                  # training tokens/s over sequence lengths 128..2048 and batches 1..16
    lorakit bench serve                  # serving 8 adapters mixed vs the base alone and vs PEFT one at a time
    lorakit bench train --quick          # any of them as a smoke run (a minute or two)

Each benchmark is a module of lorakit.bench with add_arguments(parser) and run(args), like a command;
`lorakit bench <name> --help` shows its options. Every measurement runs in a fresh process, the compared ways
take turns, and medians are reported with the load average (lorakit/bench/harness.py; docs/performance.md).
Benchmarks are never run as timed tests. docs/serving.md explains the serving benchmark's numbers.
"""

from __future__ import annotations

import argparse
import importlib

# benchmark name -> (module, one-line summary); add a benchmark by adding a line here
BENCHMARKS = {
    "train": ("lorakit.bench.train", "LoRA training step vs PEFT: tokens/s, peak memory, loss curves"),
    "infer": ("lorakit.bench.infer", "inference latency of base, merged, unmerged and mixed-adapter batches"),
    "trainer": ("lorakit.bench.trainer", "`lorakit train` on real data vs a bare training loop on the same batches"),
    "scale": ("lorakit.bench.scale", "training tokens/s over sequence lengths and batch sizes"),
    "serve": ("lorakit.bench.serve", "mixed-adapter batched serving vs the base model alone and vs PEFT one at a time"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    subparsers = parser.add_subparsers(dest="benchmark", metavar="<benchmark>", required=True)
    for name, (module_name, summary) in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=summary, description=module.__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.error = parser.error  # one-line usage errors, as every lorakit command
        module.add_arguments(sub)


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    return parser.parse_args(argv)  # subcommands cannot be parsed intermixed


def run(args: argparse.Namespace) -> int:
    return importlib.import_module(BENCHMARKS[args.benchmark][0]).run(args)
