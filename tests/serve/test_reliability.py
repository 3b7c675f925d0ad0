"""The server under load and under misbehaviour: many concurrent requests, clients that leave, adapters that are
unloaded while in use or are corrupt. Loopback only, tiny models, bounded waits (no sleeps)."""

from __future__ import annotations

import asyncio
import http.client as http_client
import json
import os
import shutil
import threading
import urllib.parse

import openai
import pytest

from tests.serve.support import BASE_NAME, chat_ids, http, make_adapter, raw_ids, start_server
from tests.tiny import tiny_tokenizer

TOKENIZER = tiny_tokenizer()
PROMPTS = ["hello", "what is two plus two", "name a colour", "translate: cat", "once", "why?", "list three", "ok"]
MAX_TOKENS = 10


async def _ask(client: openai.AsyncOpenAI, model: str, prompt: str, kind: str) -> str:
    if kind == "completion":
        answer = await client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        return answer.choices[0].text
    messages = [{"role": "user", "content": prompt}]
    if kind == "chat":
        answer = await client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS,
                                                      temperature=0)
        return answer.choices[0].message.content
    stream = await client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS,
                                                  temperature=0, stream=True)
    return "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])


def _expected(references, model: str, prompt: str, kind: str) -> str:
    ids = raw_ids(TOKENIZER, prompt) if kind == "completion" else chat_ids(TOKENIZER, prompt)
    return references.text(None if model == BASE_NAME else model, ids, MAX_TOKENS)


def _run_concurrently(url: str, jobs: list[tuple[str, str, str]]) -> list:
    async def main():
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300) as client:
            return await asyncio.gather(*(_ask(client, *job) for job in jobs), return_exceptions=True)

    return asyncio.run(main())


def test_216_concurrent_requests_across_8_adapters_and_the_base_all_answer_as_alone(served, references):
    models = [BASE_NAME, *references.adapter_dirs]
    jobs = [(m, p, kind) for m in models for p in PROMPTS for kind in ("chat", "stream", "completion")]
    assert len(jobs) == 216
    answers = _run_concurrently(served.url, jobs)
    errors = [a for a in answers if isinstance(a, BaseException)]
    assert errors == []
    wrong = [(job, answer) for job, answer in zip(jobs, answers) if answer != _expected(references, *job)]
    assert wrong == []
    per_prompt = {(m, p) for m, p, _ in jobs}
    assert len({_expected(references, m, p, "chat") for m, p in per_prompt}) > len(PROMPTS)  # adapters differ
    batches = served.engine.metrics.batch_size
    assert batches.counts[batches.buckets.index(16)] < batches.count  # some decoding steps mixed > 16 sequences
    assert served.engine.running == 0 and served.engine.waiting == 0


def test_paging_under_load_keeps_answers_exact(adapter_root, adapter_dirs, references):
    running, thread = start_server(adapter_root, engine={"max_loras": 2, "max_cpu_loras": 3, "max_batch": 8})
    try:
        jobs = [(m, p, "chat") for m in [BASE_NAME, *adapter_dirs] for p in PROMPTS[:4]]
        answers = _run_concurrently(running.url, jobs)
        assert [a for a in answers if isinstance(a, BaseException)] == []
        assert answers == [_expected(references, *job) for job in jobs]
        evictions = running.engine.metrics.adapter_evictions
        assert evictions.value(tier="compute") > 0 and evictions.value(tier="host") > 0
        assert running.engine.adapters.stats()["compute"] <= 2
    finally:
        thread.stop()
        running.server.close()


# ---- one server whose adapters the tests below load, unload and break -------------------------------------
@pytest.fixture()
def own(tmp_path, adapter_dirs, request):
    """A server with two adapters in its own adapter directory; settings from @pytest.mark.server_settings."""
    marker = request.node.get_closest_marker("server_settings")
    root = tmp_path / "adapters"
    for name in ("qv-r4", "o-r3"):
        shutil.copytree(adapter_dirs[name], root / name)
    running, thread = start_server(str(root), settings={"unload_timeout": 60, **(marker.kwargs if marker else {})})
    yield running
    thread.stop()
    running.server.close()


class Stream:
    """A raw streaming request on its own connection: read events one by one, or hang up mid-stream."""

    def __init__(self, url: str, path: str, body: dict) -> None:
        parsed = urllib.parse.urlsplit(url)
        self.connection = http_client.HTTPConnection(parsed.hostname, parsed.port, timeout=120)
        self.connection.request("POST", path, json.dumps({**body, "stream": True}),
                                {"content-type": "application/json"})
        self.response = self.connection.getresponse()
        assert self.response.status == 200

    def next_event(self) -> dict | str:
        while True:
            line = self.response.readline()
            assert line, "the stream ended early"
            if line.startswith(b"data: "):
                data = line[6:].strip().decode()
                return data if data == "[DONE]" else json.loads(data)

    def rest(self) -> list[dict]:
        events = []
        while (event := self.next_event()) != "[DONE]":
            events.append(event)
        return events

    def hang_up(self) -> None:
        self.connection.sock.close()
        self.connection.close()


def test_a_client_that_disconnects_frees_its_slot(own):
    engine = own.engine
    cancelled = engine.metrics.finished.value(reason="cancelled")
    stream = Stream(own.url, "/v1/completions", {"model": "qv-r4", "prompt": "long", "max_tokens": 400,
                                                 "ignore_eos": True})
    assert stream.next_event()["choices"][0]["text"] is not None
    stream.hang_up()
    assert engine.wait_for(lambda: engine.running == 0, timeout=60)
    assert engine.metrics.finished.value(reason="cancelled") == cancelled + 1
    # a non-streamed request whose client leaves is cancelled too
    parsed = urllib.parse.urlsplit(own.url)
    connection = http_client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
    body = {"model": "o-r3", "prompt": "x", "max_tokens": 400, "ignore_eos": True}
    connection.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
    assert engine.wait_for(lambda: engine.running == 1, timeout=60)
    connection.sock.close()
    assert engine.wait_for(lambda: engine.running == 0, timeout=60)
    assert engine.metrics.finished.value(reason="cancelled") == cancelled + 2
    engine.adapters.unload("qv-r4", timeout=0)  # no lease is left behind
    engine.adapters.unload("o-r3", timeout=0)


def test_unloading_an_adapter_in_use_waits_for_its_requests(own):
    engine = own.engine
    stream = Stream(own.url, "/v1/completions", {"model": "qv-r4", "prompt": "keep going", "max_tokens": 400,
                                                 "ignore_eos": True})
    stream.next_event()
    result = {}
    unloader = threading.Thread(target=lambda: result.update(
        answer=http(f"{own.url}/v1/unload_lora_adapter", "POST", {"lora_name": "qv-r4"})))
    unloader.start()
    assert engine.wait_for(lambda: "qv-r4" not in engine.adapters, timeout=60)  # draining: no new requests
    status, body = http(f"{own.url}/v1/completions", "POST", {"model": "qv-r4", "prompt": "x", "max_tokens": 2})
    assert status == 404
    events = stream.rest()  # the request in flight runs to its end
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    unloader.join(timeout=60)
    assert result["answer"][0] == 200 and "removed" in result["answer"][1]
    assert [m["id"] for m in http(f"{own.url}/v1/models")[1]["data"]] == [BASE_NAME, "o-r3"]
    status, body = http(f"{own.url}/v1/unload_lora_adapter", "POST", {"lora_name": "qv-r4"})
    assert status == 404


@pytest.mark.server_settings(unload_timeout=0)
def test_an_unload_that_cannot_wait_is_refused_clearly(own):
    stream = Stream(own.url, "/v1/completions", {"model": "o-r3", "prompt": "busy", "max_tokens": 400,
                                                 "ignore_eos": True})
    stream.next_event()
    status, body = http(f"{own.url}/v1/unload_lora_adapter", "POST", {"lora_name": "o-r3"})
    assert status == 409 and "still used by 1 request" in body["error"]["message"]
    assert stream.rest()[-1]["choices"][0]["finish_reason"] == "length"
    assert http(f"{own.url}/v1/completions", "POST", {"model": "o-r3", "prompt": "x", "max_tokens": 2})[0] == 200


def test_a_corrupt_adapter_fails_its_load_and_the_server_carries_on(own, references, tmp_path):
    root = own.server.settings.adapter_dir
    corrupt = os.path.join(root, "corrupt")
    shutil.copytree(os.path.join(root, "qv-r4"), corrupt)
    with open(os.path.join(corrupt, "adapter_model.safetensors"), "r+b") as fh:
        fh.truncate(40)
    load = f"{own.url}/v1/load_lora_adapter"
    status, body = http(load, "POST", {"lora_name": "broken", "lora_path": "corrupt"})
    assert status == 400 and "not a readable safetensors file" in body["error"]["message"]
    other = make_adapter(os.path.join(root, "dora"), r=2, target_modules=["q_proj"])
    with open(os.path.join(other, "adapter_config.json")) as fh:
        config = json.load(fh)
    with open(os.path.join(other, "adapter_config.json"), "w") as fh:
        json.dump({**config, "peft_type": "IA3"}, fh)
    status, body = http(load, "POST", {"lora_name": "ia3", "lora_path": "dora"})
    assert status == 400 and "IA3" in body["error"]["message"]
    assert "broken" not in own.engine.adapters and "ia3" not in own.engine.adapters
    # the server goes on: the other adapters answer exactly, health is fine
    answer = http(f"{own.url}/v1/completions", "POST", {"model": "o-r3", "prompt": "still fine", "max_tokens": 8,
                                                        "temperature": 0})
    assert answer[0] == 200
    assert answer[1]["choices"][0]["text"] == references.text("o-r3", raw_ids(TOKENIZER, "still fine"), 8)
    assert http(f"{own.url}/health")[1]["status"] == "ok"
    # a good adapter loads at run time, serves, unloads, and its name can be used again
    status, body = http(load, "POST", {"lora_name": "fresh", "lora_path": "qv-r4"})
    assert status == 200 and "added" in body
    assert http(load, "POST", {"lora_name": "fresh", "lora_path": "qv-r4"})[0] == 400  # already loaded
    answer = http(f"{own.url}/v1/completions", "POST", {"model": "fresh", "prompt": "new", "max_tokens": 8,
                                                        "temperature": 0})
    assert answer[1]["choices"][0]["text"] == references.text("qv-r4", raw_ids(TOKENIZER, "new"), 8)
    assert http(f"{own.url}/v1/unload_lora_adapter", "POST", {"lora_name": "fresh"})[0] == 200
    assert http(load, "POST", {"lora_name": "fresh", "lora_path": "o-r3"})[0] == 200
    assert own.engine.metrics.adapter_load_failures.value() == 2


def test_a_registered_adapter_that_turns_out_corrupt_fails_its_requests_only(tmp_path, adapter_dirs, references):
    root = tmp_path / "adapters"
    shutil.copytree(adapter_dirs["qv-r4"], root / "good")
    shutil.copytree(adapter_dirs["qv-r4"], root / "bad")
    (root / "bad" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    running, thread = start_server(str(root))  # found in the directory: read on first use
    try:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0)
        for _ in range(2):
            with pytest.raises(openai.BadRequestError, match="adapter 'bad'.*cannot be loaded"):
                client.completions.create(model="bad", prompt="x", max_tokens=2)
        answer = client.completions.create(model="good", prompt="fine", max_tokens=6, temperature=0)
        assert answer.choices[0].text == references.text("qv-r4", raw_ids(TOKENIZER, "fine"), 6)
        running.engine.adapters.unload("bad", timeout=0)  # the failed requests hold no lease
    finally:
        thread.stop()
        running.server.close()
