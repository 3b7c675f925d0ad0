"""Settings for the whole test session."""

from __future__ import annotations

import signal


def pytest_configure(config):
    # A session started in the background of a non-interactive shell (`make test &`, some CI runners) inherits
    # SIGINT ignored, and so would every process it starts. The Ctrl-C tests (exit code 130, nothing half-written)
    # need it delivered, as from a terminal: restore Python's own handler, which the processes the tests start
    # then get as the default.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
