"""Benchmarks: lorakit against the obvious alternative on this machine, printed as ratios.

    lorakit bench serve --quick          # a smoke run in about a minute
    lorakit bench serve                  # the full serving benchmark (docs/serving.md explains the numbers)

Each benchmark is a module of lorakit.bench with add_arguments(parser) and run(args), like a command;
`lorakit bench <name> --help` shows its options. Benchmarks are never run as timed tests.
"""

from __future__ import annotations

import argparse
import importlib

# benchmark name -> (module, one-line summary); add a benchmark by adding a line here
BENCHMARKS = {
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
