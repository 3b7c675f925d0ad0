"""The command table and the entry point: `lorakit <command> [options]` (or `python -m lorakit ...`).

Each command lives in its own module with two functions; the module docstring is its `--help` text:

    add_arguments(parser: argparse.ArgumentParser) -> None   # the command's options
    run(args: argparse.Namespace) -> int                      # does the work, returns the exit code
    parse_args(parser, argv) -> argparse.Namespace            # optional: a command with subcommands (argparse
                                                              # cannot parse those intermixed), e.g. `bench`

A command's module is imported only when that command runs (or its --help is asked for), so a missing
or broken command never stops the others.

Exit codes: 0 success; 1 an error the user can fix (the message says how); 2 bad command-line usage;
130 interrupted by Ctrl-C (also while starting up: see startup.py). Errors print one line on stderr,
"lorakit: error: ...", never a traceback, also for an unexpected error (a bug), which says so;
`--debug` adds the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from dataclasses import dataclass

PROG = "lorakit"
DESCRIPTION = "Parameter-efficient fine-tuning (LoRA and friends) of transformers models."
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


@dataclass(frozen=True)
class Command:
    name: str
    module: str  # imported lazily
    summary: str  # one line, shown by `lorakit --help`


COMMANDS = (
    Command("train", "lorakit.cli.train", "fine-tune a model as a YAML run config says (torchrun works too)"),
    Command("eval", "lorakit.cli.evaluate", "score the base model and an adapter on a data file (ROUGE, loss, ...)"),
    Command("generate", "lorakit.cli.generate", "answer prompts with a model (and adapter), batched"),
    Command("chat", "lorakit.cli.chat", "talk with a model (and adapter) interactively, streaming"),
    Command("merge", "lorakit.cli.merge", "merge an adapter into its base model and save a plain model"),
    Command("inspect", "lorakit.cli.inspect", "show a model's modules, target candidates and adapter size"),
    Command("data", "lorakit.cli.data", "show how training renders, masks and counts the data (no weights loaded)"),
    Command("serve", "lorakit.cli.serve", "serve a base model and many adapters over an OpenAI-compatible HTTP API"),
    Command("bench", "lorakit.cli.bench", "benchmarks, printed as ratios (train, infer and serve vs PEFT; scale)"),
    # demo.py is written separately; until it exists `lorakit demo` says the command is not available
    Command("demo", "lorakit.cli.demo", "a short fine-tuning demo on the embedded SmolLM2 (offline)"),
)
COMMANDS_BY_NAME = {c.name: c for c in COMMANDS}


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error ("lorakit: error: ...", exit 2) instead of the usage block."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{PROG}: error: {message} (see `{self.prog} --help`)\n")


class CommandUnavailable(RuntimeError):
    """The command's module is not installed."""


def load_command(command: Command):
    try:
        return importlib.import_module(command.module)
    except ModuleNotFoundError as err:
        if err.name != command.module:
            raise
        raise CommandUnavailable(f"the {command.name!r} command is not available in this installation "
                                 f"({command.module} is missing)") from None


def build_parser() -> ArgumentParser:
    """The top-level parser: global options and the list of commands (their options are not loaded)."""
    parser = ArgumentParser(prog=PROG, description=DESCRIPTION,
                            epilog=f"`{PROG} <command> --help` shows a command's options; exit codes: 0 ok, "
                                   "1 error, 2 bad usage, 130 interrupted.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of errors")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    for command in COMMANDS:
        subparsers.add_parser(command.name, help=command.summary)
    return parser


def build_command_parser(command: Command, module) -> ArgumentParser:
    """The parser of one command, from its module: add_arguments() and the docstring as help text."""
    parser = ArgumentParser(prog=f"{PROG} {command.name}", description=module.__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of errors")
    module.add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    from lorakit.cli import startup

    try:
        startup.restore()  # from here on Ctrl-C is a KeyboardInterrupt, caught below or by the command
        return _main(argv)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    at = command_position(argv)
    try:
        parser = build_parser()
        top = parser.parse_args(argv if at is None else argv[:at])
        if at is None:  # no command: parse_args has exited for --help / --version / a bad command
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        command = COMMANDS_BY_NAME[argv[at]]
        module = load_command(command)
        # intermixed: options may come before, between or after positionals (train CONFIG a=1 --overwrite b=2)
        command_parser = build_command_parser(command, module)
        parse = getattr(module, "parse_args", None)
        args = parse(command_parser, argv[at + 1:]) if parse else command_parser.parse_intermixed_args(argv[at + 1:])
    except SystemExit as done:  # --help, --version, or a usage error (already printed)
        return done.code if isinstance(done.code, int) else EXIT_OK
    except CommandUnavailable as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    args.debug = args.debug or top.debug
    quiet_libraries()
    setup_logging()
    try:
        return int(module.run(args) or EXIT_OK)
    except _user_errors() as err:
        if args.debug:
            traceback.print_exc()
        print(f"{_rank_prefix()}{PROG}: error: {describe(err)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as err:  # noqa: BLE001 - a bug, still one line; --debug shows where
        if args.debug:
            traceback.print_exc()
        print(f"{_rank_prefix()}{PROG}: error: unexpected {type(err).__name__}: {one_line(err)} (a bug in lorakit "
              "or a library it uses; --debug shows the traceback, please report it)", file=sys.stderr)
        return EXIT_ERROR


def command_position(argv: list[str]) -> int | None:
    """Index of the command name: the first argument that is not an option (None when absent or unknown)."""
    at = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    return at if at is not None and argv[at] in COMMANDS_BY_NAME else None


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that come from bad input (our code raises these with messages meant for people).

    OSError covers missing files and what transformers raises for a directory that is not a model."""
    from lorakit.train.setup import RunError

    return ValueError, TypeError, OSError, RunError


def describe(err: BaseException) -> str:
    """The one-line message of a user error; a bare disk-full OSError gets the file it concerns and advice."""
    from lorakit.atomic import DiskFullError, is_disk_full

    if is_disk_full(err) and not isinstance(err, DiskFullError):
        where = f" {err.filename}" if getattr(err, "filename", None) else ""
        return f"disk full: could not write{where} ({err.strerror or err}). Free some space and run again."
    return one_line(err)


def one_line(err: BaseException) -> str:
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return text or type(err).__name__


def _rank_prefix() -> str:
    rank = os.environ.get("RANK", "0")
    return "" if rank == "0" else f"[rank {rank}] "


def quiet_libraries() -> None:
    """No transformers / hub progress bars or info logs in the CLI (our own training bar stays)."""
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars
    except ImportError:  # pragma: no cover - very old huggingface_hub
        return
    disable_progress_bars()


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{PROG}: {record.levelname.lower()}: {record.getMessage()}"


def setup_logging() -> None:
    """lorakit's warnings (e.g. examples dropped by the data pipeline) as "lorakit: warning: ..." lines.

    Left alone when the root logger already has handlers (an application or pytest configured logging)."""
    logger = logging.getLogger("lorakit")
    if logging.getLogger().handlers or any(getattr(h, "lorakit_cli", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    handler.lorakit_cli = True
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if _rank_prefix() == "" else logging.ERROR)


def _version() -> str:
    from lorakit import __version__

    return __version__


if __name__ == "__main__":
    raise SystemExit(main())
