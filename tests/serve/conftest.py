"""Fixtures of the serving tests: eight adapters on disk, their references, one server for the module."""

from __future__ import annotations

import os

import pytest
import torch

from tests.serve.support import ADAPTER_SPECS, References, make_adapters, start_server


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread_for_tiny_models():
    """One torch thread for every serving test (the engine threads included): on a busy 2-core machine, two
    threads spinning on each tiny op make a tiny model's step ten times slower (see tests/train_fixtures.py)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def adapter_root(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("adapters")
    make_adapters(str(root))
    return str(root)


@pytest.fixture(scope="session")
def adapter_dirs(adapter_root) -> dict[str, str]:
    return {name: os.path.join(adapter_root, name) for name in ADAPTER_SPECS}


@pytest.fixture(scope="session")
def references(adapter_dirs) -> References:
    return References(adapter_dirs)


@pytest.fixture(scope="module")
def served(adapter_root, adapter_dirs):
    """A server on an ephemeral loopback port: the base model and the eight adapters (two given by the operator,
    read at start; the others found in the adapter directory, read on first use)."""
    operator = {name: adapter_dirs[name] for name in list(adapter_dirs)[:2]}
    running, thread = start_server(adapter_root, operator)
    yield running
    thread.stop()
    running.server.close()
