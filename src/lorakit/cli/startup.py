"""Ctrl-C while the `lorakit` command is still starting: exit quietly with code 130.

Importing torch and transformers takes the first seconds of every command, and an interrupt there would print
a KeyboardInterrupt traceback from deep inside an import. `lorakit/__init__.py` calls `install()` first thing;
it acts only when this process is the `lorakit` command (the console script, `python -m lorakit`,
`torchrun ... -m lorakit`), never when a program imports lorakit as a library. `cli.main.main` puts Python's
own handler back (`restore()`) as soon as it can catch KeyboardInterrupt itself.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

EXIT_INTERRUPTED = 130


def running_as_command() -> bool:
    """True for `lorakit ...` and `python -m lorakit ...` (sys.orig_argv keeps the -m while the package imports)."""
    if sys.argv and os.path.basename(sys.argv[0]) in ("lorakit", "lorakit.exe"):
        return True
    original = list(getattr(sys, "orig_argv", []))
    return any(a == "-m" and b == "lorakit" for a, b in zip(original, original[1:]))


def _exit_quietly(signum, frame) -> None:
    sys.stderr.write("\nlorakit: interrupted\n")
    raise SystemExit(EXIT_INTERRUPTED)


def install() -> None:
    if (running_as_command() and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
        signal.signal(signal.SIGINT, _exit_quietly)


def restore() -> None:
    if signal.getsignal(signal.SIGINT) is _exit_quietly:
        signal.signal(signal.SIGINT, signal.default_int_handler)
