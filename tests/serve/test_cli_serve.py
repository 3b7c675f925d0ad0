"""`lorakit serve` and `lorakit bench serve` from the command line."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys

import pytest
import torch

from lorakit.cli.serve import parse_adapters
from tests.integration.cli_support import make_adapter, make_model_dir, run_cli
from tests.serve.support import http


@pytest.fixture(scope="module")
def model_and_adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-serve")
    model_dir = make_model_dir(root / "model")
    return model_dir, make_adapter(model_dir, root / "run" / "adapter")


def test_help(capsys):
    code, out, _ = run_cli(capsys, "serve", "--help")
    assert code == 0 and out.startswith("usage: lorakit serve")
    for option in ("--adapter NAME=DIR", "--adapter-dir", "--max-loras", "--max-cpu-loras", "--api-key",
                   "--host HOST", "127.0.0.1", "/v1/chat/completions"):
        assert option in out
    code, out, _ = run_cli(capsys, "bench", "--help")
    assert code == 0 and "serve" in out
    code, out, _ = run_cli(capsys, "bench", "serve", "--help")
    assert code == 0 and out.startswith("usage: lorakit bench serve") and "--quick" in out and "mixed/peft" in out


def test_bad_options_fail_before_loading_anything(capsys, tmp_path):
    code, _, err = run_cli(capsys, "serve", "--adapter", "no-equals-sign")
    assert code == 1 and "expected NAME=DIR" in err
    code, _, err = run_cli(capsys, "serve", "--adapter", "a/b=somewhere")
    assert code == 1 and "not allowed" in err
    code, _, err = run_cli(capsys, "serve", "--max-loras", "0")
    assert code == 1 and "--max-loras must be a positive integer" in err
    busy = socket.create_server(("127.0.0.1", 0))
    try:
        code, _, err = run_cli(capsys, "serve", "--port", busy.getsockname()[1])
        assert code == 1 and f"cannot listen on 127.0.0.1:{busy.getsockname()[1]}" in err and "--port" in err
    finally:
        busy.close()
    code, _, err = run_cli(capsys, "bench", "serve", "--ways", "mixed,magic")
    assert code == 1 and "unknown ['magic']" in err
    code, _, err = run_cli(capsys, "bench", "nothing")
    assert code == 2 and "invalid choice" in err


def test_adapter_specs(model_and_adapter):
    _, adapter = model_and_adapter
    run_dir = os.path.dirname(adapter)
    assert parse_adapters([f"a={adapter}", f"b={run_dir}"]) == {"a": str(adapter), "b": str(adapter)}
    with pytest.raises(ValueError, match="given twice"):
        parse_adapters([f"a={adapter}", f"a={adapter}"])


def test_serve_runs_until_interrupted(model_and_adapter):
    """Also: the server re-executes itself on the preferred malloc (cli/startup.py) and names it."""
    from tests.integration.cli_support import preferred_malloc

    model_dir, adapter = model_and_adapter
    clean, malloc = preferred_malloc()
    env = {**clean, "PYTHONWARNINGS": "ignore", "LORAKIT_API_KEY": "cli-key"}
    process = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", "--model", str(model_dir), "--adapter",
                                f"mine={adapter}", "--port", "0", "--max-model-len", "128"],
                               stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = [process.stderr.readline() for _ in range(2)]  # the adapter read at start, then the address
        assert lines[0].startswith("lorakit: info: adapter mine read from"), lines
        match = re.search(r"model with 1 adapter\(s\) on (http://127\.0\.0\.1:\d+) .*; malloc: (\w+)\)$",
                          lines[1].strip())
        assert match and match.group(2) == malloc, (lines, malloc)
        url = match.group(1)
        assert http(f"{url}/v1/models")[0] == 401  # the key from $LORAKIT_API_KEY
        status, body = http(f"{url}/v1/completions", "POST", {"model": "mine", "prompt": "hi", "max_tokens": 3},
                            headers={"authorization": "Bearer cli-key"})
        assert status == 200 and body["usage"]["completion_tokens"] >= 1
        lines = [json.loads(process.stderr.readline()) for _ in range(2)]  # one JSON line per request
        assert [(line["path"], line["status"]) for line in lines] == [("/v1/models", 401), ("/v1/completions", 200)]
        process.send_signal(signal.SIGINT)  # uvicorn shuts down gracefully, then lorakit's Ctrl-C exit code
        assert process.wait(timeout=60) == 130
        assert "lorakit: interrupted" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()


@pytest.mark.filterwarnings("ignore::FutureWarning")  # HF PEFT, the one-at-a-time baseline, uses a deprecated API
def test_bench_serve_smoke(capsys, model_and_adapter, tmp_path):
    model_dir, _ = model_and_adapter
    code, out, err = run_cli(capsys, "bench", "serve", "--quick", "--model", model_dir, "--adapters", "3",
                             "--requests", "6", "--max-tokens", "4", "--peft-requests", "2", "--ranks", "2,4",
                             "--ways", "mixed,base,peft,http", "--output", tmp_path / "bench.json")
    assert code == 0, err
    assert "mixed / base =" in out and "mixed / peft one at a time =" in out
    results = json.loads((tmp_path / "bench.json").read_text())
    assert set(results["results"]) == {"mixed", "base", "peft", "http"}
    assert results["results"]["mixed"]["tokens"] == results["results"]["base"]["tokens"] == 6 * 4
    assert results["results"]["http"]["tokens"] == 6 * 4
    assert results["results"]["peft"]["tokens"] == 2 * 4
    assert results["ratios"]["mixed_over_base"] > 0 and results["ratios"]["mixed_over_peft_cpu"] > 0
    assert all(row["cpu_seconds"] > 0 for row in results["results"].values())
    assert results["machine"]["probe"]["copy_gb_s"]["median"] > 0 and "machine probe over the runs" in out


def test_bench_serve_in_bf16(capsys, model_and_adapter, tmp_path, monkeypatch):
    """--dtype loads the base in that dtype for every way (as `lorakit serve --dtype` does)."""
    from lorakit.models import loading

    model_dir, _ = model_and_adapter
    loaded = []
    original = loading.load_model_and_tokenizer

    def recording(*args, **kwargs):
        model, tokenizer = original(*args, **kwargs)
        loaded.append(next(model.parameters()).dtype)
        return model, tokenizer

    monkeypatch.setattr(loading, "load_model_and_tokenizer", recording)
    monkeypatch.setattr("lorakit.models.load_model_and_tokenizer", recording)
    code, out, err = run_cli(capsys, "bench", "serve", "--quick", "--model", model_dir, "--adapters", "2",
                             "--requests", "4", "--max-tokens", "3", "--peft-requests", "2", "--ranks", "2",
                             "--ways", "mixed,base,peft", "--dtype", "bfloat16", "--output", tmp_path / "bench.json")
    assert code == 0, err
    assert "(bfloat16)" in out
    results = json.loads((tmp_path / "bench.json").read_text())
    assert results["args"]["dtype"] == "bfloat16"
    assert results["results"]["mixed"]["tokens"] == results["results"]["base"]["tokens"] == 4 * 3
    assert loaded[0] == torch.float32 and set(loaded[1:]) == {torch.bfloat16}  # the adapters are made in fp32
    code, _, err = run_cli(capsys, "bench", "serve", "--dtype", "float16")
    assert code == 2 and "invalid choice" in err
