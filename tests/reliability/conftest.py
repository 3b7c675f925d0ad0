"""Reliability tests run tiny training runs: one torch thread each (see tests/train_fixtures.py)."""

from tests.train_fixtures import one_torch_thread  # noqa: F401  (an autouse fixture)
