"""What keeps the server safe to expose: the API key, adapter paths confined to the adapter directory, the
request body limit.

- API key (`--api-key` or $LORAKIT_API_KEY): every /v1/ route and /metrics need `Authorization: Bearer KEY`
  (401 otherwise), compared in constant time; /health and the playground page stay open (the page asks
  for the key and sends it with its API calls).
- Adapter paths a client sends (POST /v1/load_lora_adapter) and adapter directories found by --adapter-dir
  must stay inside that directory: no absolute paths, no `..`, and no symlink (of the directory or of
  its files) that leads outside. Paths the operator gives on the command line (--adapter name=path) are
  trusted as given.
- Request bodies larger than the limit get 413 before they are read in full.
"""

from __future__ import annotations

import hmac
import json
import os
import re

from lorakit.adapter_files import RUN_ADAPTER_SUBDIR, WEIGHTS_NAME
from lorakit.config import CONFIG_NAME
from lorakit.serve.openai_api import error_body

API_KEY_ENV = "LORAKIT_API_KEY"
PROTECTED_PREFIXES = ("/v1/", "/metrics")
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


class PathRefused(ValueError):
    """An adapter path that would leave the adapter directory (or is no adapter directory)."""


def check_adapter_name(name: str) -> None:
    if not ADAPTER_NAME.match(name or "") or ".." in name:
        raise ValueError(f"adapter name {name!r} is not allowed: use letters, digits, '_', '-' and '.' (at most 128 "
                         "characters, starting with a letter or digit)")


def _inside(root: str, path: str) -> bool:
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    return real == real_root or real.startswith(real_root + os.sep)


def confined_adapter_dir(root: str, relative: str) -> str:
    """The adapter directory `relative` names inside `root` (a training run's output_dir resolves to its
    adapter/), or PathRefused saying why not."""
    if not relative or "\x00" in relative:
        raise PathRefused("lora_path is empty")
    if os.path.isabs(relative) or relative.startswith("~") or re.match(r"^[A-Za-z]:", relative):
        raise PathRefused(f"lora_path {relative!r} is absolute; give a path relative to the server's adapter "
                          "directory (--adapter-dir)")
    if ".." in re.split(r"[\\/]+", relative):
        raise PathRefused(f"lora_path {relative!r} contains '..'; adapters must stay inside the adapter directory")
    candidate = os.path.join(root, relative)
    if not _inside(root, candidate):
        raise PathRefused(f"lora_path {relative!r} leads outside the adapter directory (through a symlink)")
    if not os.path.isdir(candidate):
        raise PathRefused(f"lora_path {relative!r} is not a directory inside the adapter directory")
    directory = candidate
    if not os.path.isfile(os.path.join(directory, CONFIG_NAME)) and \
            os.path.isfile(os.path.join(directory, RUN_ADAPTER_SUBDIR, CONFIG_NAME)):
        directory = os.path.join(directory, RUN_ADAPTER_SUBDIR)
    for name in (CONFIG_NAME, WEIGHTS_NAME, ""):
        path = os.path.join(directory, name) if name else directory
        if os.path.lexists(path) and not _inside(root, path):
            raise PathRefused(f"lora_path {relative!r}: {name or 'the directory'} is a symlink leading outside the "
                              "adapter directory")
    if not os.path.isfile(os.path.join(directory, CONFIG_NAME)):
        raise PathRefused(f"lora_path {relative!r} holds no {CONFIG_NAME}; it is not an adapter directory")
    return directory


def discover_adapters(root: str) -> tuple[dict[str, str], list[str]]:
    """({name: directory} for every adapter directory directly inside root, [why each other entry was skipped]).
    Only names and paths: no file is read (a thousand adapters register in milliseconds)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--adapter-dir {root!r} is not a directory")
    found, skipped = {}, []
    with os.scandir(root) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            try:
                check_adapter_name(entry.name)
                found[entry.name] = confined_adapter_dir(root, entry.name)
            except ValueError as err:
                skipped.append(f"{entry.name}: {err}")
    return found, skipped


class ApiKeyCheck:
    """ASGI middleware: 401 on protected routes unless the request carries the key."""

    def __init__(self, app, api_key: str) -> None:
        if not api_key:
            raise ValueError("the API key is empty")
        self.app = app
        self.expected = api_key.encode()

    def allowed(self, headers: list[tuple[bytes, bytes]]) -> bool:
        value = dict(headers).get(b"authorization", b"")
        scheme, _, token = value.partition(b" ")
        # compare_digest takes time independent of where the key differs
        return hmac.compare_digest(token.strip(), self.expected) and scheme.lower() == b"bearer"

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith(PROTECTED_PREFIXES) and \
                not self.allowed(scope.get("headers", [])):
            await send_json(send, 401, error_body(401, "a valid API key is required: send the header "
                                                       "'Authorization: Bearer <key>'", code="invalid_api_key"),
                            [(b"www-authenticate", b"Bearer")])
            return
        await self.app(scope, receive, send)


class BodySizeLimit:
    """ASGI middleware: 413 for a body over `max_bytes` (by Content-Length, or counted as it arrives)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._refuse(send)
        received, refused = 0, False

        async def counting_receive():
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request" and not refused:
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = True
                    await self._refuse(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if not refused:  # the 413 went out already; what the app answers to the cut body is dropped
                await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not refused:
                raise

    async def _refuse(self, send) -> None:
        await send_json(send, 413, error_body(413, f"the request body is larger than the limit of {self.max_bytes} "
                                                   "bytes", code="request_too_large"))


async def send_json(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})
