"""Ctrl-C while the `lorakit` command is still starting: exit quietly with code 130.

Importing torch and transformers takes the first seconds of every command, and an interrupt there would print
a KeyboardInterrupt traceback from deep inside an import. `lorakit/__init__.py` calls `install()` first thing;
it acts only when this process is the `lorakit` command (the console script, `python -m lorakit`,
`torchrun ... -m lorakit`), never when a program imports lorakit as a library. `cli.main.main` puts Python's
own handler back (`restore()`) as soon as it can catch KeyboardInterrupt itself.

The commands that run a model (training, evaluation, generation, serving) also get their malloc here, before
torch is imported: `install()` re-executes them once with tcmalloc preloaded when it is installed, or else keeps
glibc's malloc from returning freed memory (lorakit/train/runtime.py).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

EXIT_INTERRUPTED = 130
# the commands whose process runs a model, and so takes the preferred malloc (train/runtime.py): training allocates
# and frees hundreds of MB a step; generation and serving gain too (a bf16 prompt's forward ~15% faster, serving
# ~3%: docs/performance.md, optimisation 48)
MODEL_COMMANDS = ("train", "demo", "eval", "generate", "chat", "serve")


def running_as_command() -> bool:
    """True for `lorakit ...` and `python -m lorakit ...` (sys.orig_argv keeps the -m while the package imports)."""
    if sys.argv and os.path.basename(sys.argv[0]) in ("lorakit", "lorakit.exe"):
        return True
    original = list(getattr(sys, "orig_argv", []))
    return any(a == "-m" and b == "lorakit" for a, b in zip(original, original[1:]))


def _exit_quietly(signum, frame) -> None:
    sys.stderr.write("\nlorakit: interrupted\n")
    raise SystemExit(EXIT_INTERRUPTED)


def command_name() -> str | None:
    """The command this `lorakit` process runs (None without one), found as the command line's parser finds it."""
    from lorakit.cli.main import command_position

    at = command_position(sys.argv[1:])
    return None if at is None else sys.argv[1 + at]


def install() -> None:
    if running_as_command() and command_name() in MODEL_COMMANDS:
        from lorakit.train.runtime import tune_process, use_preferred_allocator

        use_preferred_allocator()  # returns unless it re-executes the process on tcmalloc
        tune_process()  # still here: glibc's malloc, kept from returning freed memory (no-op on another malloc)
    if (running_as_command() and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
        signal.signal(signal.SIGINT, _exit_quietly)


def restore() -> None:
    if signal.getsignal(signal.SIGINT) is _exit_quietly:
        signal.signal(signal.SIGINT, signal.default_int_handler)
