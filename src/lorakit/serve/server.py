"""Putting a server together (model -> engine -> app) and running it with uvicorn, in the foreground or in a
background thread on an ephemeral loopback port (tests, benchmarks).

    server = build_server(model, tokenizer, ServerSettings("tiny"), EngineSettings(max_loras=2),
                          adapters={"a": "/path/to/a"}, adapter_dir=None)
    with ServerThread(server.app) as url:       # "http://127.0.0.1:<port>"
        ...
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI

from lorakit.serve.app import ServerSettings, create_app
from lorakit.serve.engine import Engine, EngineSettings
from lorakit.serve.metrics import ACCESS_LOG
from lorakit.serve.security import check_adapter_name, discover_adapters

log = logging.getLogger("lorakit.serve")


@dataclass
class Server:
    engine: Engine
    app: FastAPI
    settings: ServerSettings

    def close(self) -> None:
        self.engine.stop()


def build_server(model, tokenizer, settings: ServerSettings, engine_settings: EngineSettings,
                 adapters: dict[str, str] | None = None, preload: bool = True) -> Server:
    """Start an engine on `model` with the operator's adapters ({name: directory}, read now when `preload` so
    a bad one fails at start) and every adapter directory inside settings.adapter_dir (read on first use)."""
    engine = Engine(model, tokenizer, engine_settings)
    try:
        for name, directory in (adapters or {}).items():
            check_adapter_name(name)
            if name == settings.served_model_name:
                raise ValueError(f"adapter name {name!r} is the base model's name; choose another")
            if preload:
                engine.adapters.load_now(name, directory)
            else:
                engine.adapters.register(name, directory)
        if settings.adapter_dir is not None:
            found, skipped = discover_adapters(settings.adapter_dir)
            for reason in skipped:
                log.warning("--adapter-dir: skipped %s", reason)
            for name, directory in found.items():
                if name not in (adapters or {}) and name != settings.served_model_name:
                    engine.adapters.register(name, directory)
        engine.start()
    except BaseException:
        engine.stop()
        raise
    return Server(engine, create_app(engine, tokenizer, settings), settings)


def configure_access_log(stream=None) -> None:
    """JSON lines on stderr, nothing else on those lines (for log shippers)."""
    logger = logging.getLogger(ACCESS_LOG)
    if not any(getattr(h, "lorakit_access", False) for h in logger.handlers):
        handler = logging.StreamHandler(stream or sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.lorakit_access = True
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or an OSError that says which address could not be used."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=1024)
    except OSError as err:
        raise OSError(f"cannot listen on {host}:{port} ({err.strerror or err}); is another server using that port? "
                      "Choose another with --port") from None


def run(app: FastAPI, sock: socket.socket) -> None:
    """Serve in the foreground until Ctrl-C (uvicorn's graceful shutdown)."""
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])


class ServerThread:
    """uvicorn in a daemon thread on a socket bound before the thread starts: the URL works at once (connections
    wait in the listen backlog until uvicorn accepts them), no polling for readiness."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sock = bind(host, port)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=2, backlog=1024)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="lorakit-serve-http", daemon=True)

    def start(self) -> str:
        self.thread.start()
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

