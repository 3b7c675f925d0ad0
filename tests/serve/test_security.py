"""API key, adapter paths confined to the adapter directory, request limits answered with 4xx."""

from __future__ import annotations

import hmac
import http.client as http_client
import json
import os
import shutil
import urllib.parse

import openai
import pytest

from lorakit.serve import security
from lorakit.serve.security import ApiKeyCheck, PathRefused, confined_adapter_dir, discover_adapters
from tests.serve.support import BASE_NAME, http, start_server

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture()
def adapter_tree(tmp_path, adapter_dirs):
    """root/ with one adapter, a run output dir (run/adapter), and symlinks leading out of root."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    shutil.copytree(adapter_dirs["qv-r4"], root / "good")
    shutil.copytree(adapter_dirs["o-r3"], root / "run" / "adapter")
    shutil.copytree(adapter_dirs["mlp-r2"], outside / "secret")
    os.symlink(outside / "secret", root / "link-out")
    (root / "file-link").mkdir()
    shutil.copy(adapter_dirs["qv-r4"] + "/adapter_config.json", root / "file-link")
    os.symlink(outside / "secret" / "adapter_model.safetensors", root / "file-link" / "adapter_model.safetensors")
    os.symlink(root / "good", root / "link-in")  # a symlink that stays inside is fine
    (root / "not an adapter").mkdir()
    return str(root), str(outside)


def test_paths_stay_inside_the_adapter_directory(adapter_tree):
    root, outside = adapter_tree
    assert confined_adapter_dir(root, "good") == os.path.join(root, "good")
    assert confined_adapter_dir(root, "run") == os.path.join(root, "run", "adapter")
    assert confined_adapter_dir(root, "link-in") == os.path.join(root, "link-in")
    refused = {
        "../outside/secret": "contains '..'", "good/../../outside/secret": "contains '..'",
        os.path.join(outside, "secret"): "is absolute", "~/x": "is absolute", "link-out": "through a symlink",
        "file-link": "adapter_model.safetensors is a symlink leading outside", "missing": "is not a directory",
        "not an adapter": "holds no adapter_config.json", "": "empty",
    }
    for path, message in refused.items():
        with pytest.raises(PathRefused, match=message):
            confined_adapter_dir(root, path)


def test_discovery_takes_only_confined_adapter_directories(adapter_tree):
    root, _ = adapter_tree
    found, skipped = discover_adapters(root)
    assert sorted(found) == ["good", "link-in", "run"]
    assert sorted(s.split(":")[0] for s in skipped) == ["file-link", "link-out", "not an adapter"]


def test_runtime_loading_is_confined_and_off_without_an_adapter_directory(adapter_tree, adapter_dirs):
    root, outside = adapter_tree
    running, thread = start_server(root)
    try:
        url = running.url
        load = f"{url}/v1/load_lora_adapter"
        for path in ("../outside/secret", os.path.join(outside, "secret"), "link-out", "file-link"):
            status, body = http(load, "POST", {"lora_name": "x", "lora_path": path})
            assert status == 400 and body["error"]["code"] == "invalid_path", path
        status, body = http(load, "POST", {"lora_name": "../x", "lora_path": "good"})
        assert status == 400 and "not allowed" in body["error"]["message"]
        status, body = http(load, "POST", {"lora_name": BASE_NAME, "lora_path": "good"})
        assert status == 400 and "base model" in body["error"]["message"]
        assert "x" not in running.engine.adapters
    finally:
        thread.stop()
        running.server.close()
    running, thread = start_server(None, {"qv-r4": adapter_dirs["qv-r4"]})
    try:
        status, body = http(f"{running.url}/v1/load_lora_adapter", "POST", {"lora_name": "y", "lora_path": "good"})
        assert status == 403 and "--adapter-dir" in body["error"]["message"]
    finally:
        thread.stop()
        running.server.close()


def test_api_key(adapter_dirs):
    running, thread = start_server(None, {"qv-r4": adapter_dirs["qv-r4"]}, settings={"api_key": "s3cret"})
    try:
        url = running.url
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic s3cret"},
                        {"authorization": "s3cret"}):
            status, body = http(f"{url}/v1/models", headers=headers)
            assert status == 401 and body["error"]["code"] == "invalid_api_key", headers
        assert http(f"{url}/metrics")[0] == 401
        assert http(f"{url}/health")[0] == 200 and http(f"{url}/")[0] == 200  # open: the page asks for the key
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in client.models.list().data] == [BASE_NAME, "qv-r4"]
        answer = client.chat.completions.create(model="qv-r4", messages=USER, max_tokens=2, temperature=0)
        assert answer.choices[0].finish_reason in ("length", "stop")
    finally:
        thread.stop()
        running.server.close()


def test_every_key_check_is_a_constant_time_comparison(monkeypatch):
    """Each request's token (missing, wrong scheme or wrong key included) goes through hmac.compare_digest,
    whose time does not depend on where the bytes differ; no early exit before it."""
    calls, compare = [], hmac.compare_digest
    monkeypatch.setattr(security.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or compare(a, b))
    check = ApiKeyCheck(app=None, api_key="s3cret")
    assert check.allowed([(b"authorization", b"Bearer s3cret")])
    assert not check.allowed([(b"authorization", b"Bearer s3creX")])
    assert not check.allowed([(b"authorization", b"Basic s3cret")])
    assert not check.allowed([])
    assert calls == [(b"s3cret", b"s3cret"), (b"s3creX", b"s3cret"), (b"s3cret", b"s3cret"), (b"", b"s3cret")]
    with pytest.raises(ValueError, match="empty"):
        ApiKeyCheck(app=None, api_key="")


def test_request_limits_are_answered_with_4xx(adapter_dirs):
    running, thread = start_server(None, settings={"max_body_bytes": 2000, "max_concurrent_requests": 1,
                                                   "max_prompt_tokens": 100})
    try:
        url = running.url
        status, body = http(f"{url}/v1/chat/completions", "POST",
                            {"model": BASE_NAME, "messages": [{"role": "user", "content": "x" * 5000}]})
        assert status == 413 and "2000 bytes" in body["error"]["message"]
        assert _chunked_post(url, b"x" * 5000)[0] == 413  # no Content-Length: counted as it arrives
        status, body = http(f"{url}/v1/chat/completions", "POST",
                            {"model": BASE_NAME, "messages": [{"role": "user", "content": "y" * 150}]})
        assert status == 400 and body["error"]["code"] == "context_length_exceeded"
        # one request in flight (a long stream, its first event read) -> the next one gets 429
        parsed = urllib.parse.urlsplit(url)
        connection = http_client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
        connection.request("POST", "/v1/completions", json.dumps(
            {"model": BASE_NAME, "prompt": "hold", "max_tokens": 400, "stream": True, "ignore_eos": True}),
            {"content-type": "application/json"})
        stream = connection.getresponse()
        assert stream.status == 200 and stream.readline().startswith(b"data: ")
        status, body = http(f"{url}/v1/completions", "POST", {"model": BASE_NAME, "prompt": "no", "max_tokens": 2})
        assert status == 429 and body["error"]["type"] == "rate_limit_error"
        rest = stream.read().decode()
        assert rest.rstrip().endswith("data: [DONE]")
        connection.close()
        assert http(f"{url}/v1/completions", "POST", {"model": BASE_NAME, "prompt": "ok", "max_tokens": 2})[0] == 200
        assert running.engine.running == 0 and http(f"{url}/health")[1]["status"] == "ok"
    finally:
        thread.stop()
        running.server.close()


def _chunked_post(url: str, body: bytes) -> tuple[int, bytes]:
    parsed = urllib.parse.urlsplit(url)
    connection = http_client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
    connection.request("POST", "/v1/completions", body=iter([body[:1000], body[1000:]]),
                       headers={"content-type": "application/json"}, encode_chunked=True)
    response = connection.getresponse()
    result = response.status, response.read()
    connection.close()
    return result
