"""The OpenAI-compatible API through the official `openai` client, plus the endpoints around it."""

from __future__ import annotations

import json
import logging

import openai
import pytest

from tests.serve.support import BASE_NAME, chat_ids, http, raw_ids
from tests.tiny import tiny_tokenizer

TOKENIZER = tiny_tokenizer()


@pytest.fixture(scope="module")
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)


def test_models_lists_the_base_and_every_adapter(client, adapter_dirs):
    models = client.models.list().data
    assert models[0].id == BASE_NAME and sorted(m.id for m in models[1:]) == sorted(adapter_dirs)
    assert models[0].parent is None and {m.parent for m in models[1:]} == {BASE_NAME}


@pytest.mark.parametrize("model", [BASE_NAME, "all-r8", "pattern"])
def test_chat_completion_applies_the_chat_template_and_equals_the_adapter_alone(client, references, model):
    messages = [{"role": "user", "content": "What is LoRA?"}]
    answer = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0)
    prompt = chat_ids(TOKENIZER, "What is LoRA?")
    expected = references.ids(None if model == BASE_NAME else model, prompt, 10)
    assert answer.choices[0].message.content == TOKENIZER.decode(expected, skip_special_tokens=True)
    assert answer.choices[0].message.role == "assistant" and answer.model == model
    assert answer.choices[0].finish_reason == ("length" if len(expected) == 10 else "stop")
    assert answer.usage.prompt_tokens == len(prompt)
    assert answer.usage.completion_tokens == len(expected) + (len(expected) < 10)  # the stop token counts
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_streamed_chat_adds_up_to_the_same_answer(client, references):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Stream this."}]
    stream = client.chat.completions.create(model="qv-r4", messages=messages, max_tokens=14, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    prompt = TOKENIZER.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = TOKENIZER(prompt, add_special_tokens=False)["input_ids"]
    assert text == references.text("qv-r4", ids, 14)
    assert len(finish) == 1 and chunks[-1].usage.prompt_tokens == len(ids) and chunks[-1].choices == []


def test_completions_take_several_prompts_and_n(client, references):
    prompts = ["Once upon a time", "The capital of"]
    answer = client.completions.create(model="mlp-r2", prompt=prompts, max_tokens=8, temperature=0, n=2)
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    for i, prompt in enumerate(prompts):
        expected = references.text("mlp-r2", raw_ids(TOKENIZER, prompt), 8)
        assert answer.choices[2 * i].text == answer.choices[2 * i + 1].text == expected  # greedy: n copies
    assert answer.usage.prompt_tokens == sum(len(raw_ids(TOKENIZER, p)) for p in prompts)
    tokens = client.completions.create(model=BASE_NAME, prompt=raw_ids(TOKENIZER, "ids"), max_tokens=4,
                                       temperature=0)
    assert tokens.choices[0].text == references.text(None, raw_ids(TOKENIZER, "ids"), 4)
    streamed = list(client.completions.create(model="mlp-r2", prompt=prompts[0], max_tokens=8, temperature=0, n=2,
                                              stream=True, stream_options={"include_usage": True}))
    for index in range(2):  # the n choices stream interleaved, told apart by their index
        assert "".join(c.choices[0].text for c in streamed if c.choices and c.choices[0].index == index) == \
            answer.choices[0].text
    expected = references.ids("mlp-r2", raw_ids(TOKENIZER, prompts[0]), 8)
    assert streamed[-1].choices == [] and streamed[-1].usage.prompt_tokens == len(raw_ids(TOKENIZER, prompts[0]))
    assert streamed[-1].usage.completion_tokens == 2 * (len(expected) + (len(expected) < 8))  # a stop token counts


def test_stop_strings_cut_the_answer(client, references):
    full = references.text("rslora-r16", raw_ids(TOKENIZER, "stop here:"), 20)
    # a character of the answer seen there for the first time, after a few others (the tiny model's text is noise)
    cut = next(i for i in range(3, len(full)) if full[i] != "\ufffd" and full[i] not in full[:i])
    answer = client.completions.create(model="rslora-r16", prompt="stop here:", max_tokens=20, temperature=0,
                                       stop=[full[cut], "\x00never"])
    assert answer.choices[0].text == full[:cut] and answer.choices[0].finish_reason == "stop"
    assert answer.usage.completion_tokens < 20
    streamed = client.completions.create(model="rslora-r16", prompt="stop here:", max_tokens=20, temperature=0,
                                         stop=full[cut:cut + 2], stream=True)
    assert "".join(c.choices[0].text for c in streamed) == full[:cut]


def test_seeded_sampling_is_reproducible(client):
    def sample(seed):
        return client.chat.completions.create(model="regex-r6", messages=[{"role": "user", "content": "roll"}],
                                              max_tokens=12, temperature=1.0, top_p=0.9, seed=seed,
                                              n=2).choices

    first, again, other = sample(7), sample(7), sample(8)
    assert [c.message.content for c in first] == [c.message.content for c in again]
    assert first[0].message.content != first[1].message.content  # n choices differ
    assert [c.message.content for c in first] != [c.message.content for c in other]


def test_bad_requests_get_clear_4xx_errors(client, served):
    user = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError, match="'no-such-adapter' does not exist"):
        client.chat.completions.create(model="no-such-adapter", messages=user)
    cases = [
        (dict(max_tokens=10_000), "above this server's limit"),
        (dict(n=40), "at most 16"),
        (dict(stop=["a", "b", "c", "d", "e"]), "at most 4"),
        (dict(temperature=3), "temperature"),
        (dict(logprobs=True), "not supported by lorakit serve: logprobs"),
        (dict(presence_penalty=0.5), "presence_penalty"),
    ]
    for extra, message in cases:
        with pytest.raises(openai.BadRequestError, match=message):
            client.chat.completions.create(model=BASE_NAME, messages=user, **extra)
    with pytest.raises(openai.BadRequestError, match="this server accepts at most"):
        client.completions.create(model=BASE_NAME, prompt="x" * 600)
    with pytest.raises(openai.BadRequestError, match="outside the model's vocabulary"):
        client.completions.create(model=BASE_NAME, prompt=[1, 2, 99999])
    url = f"{served.url}/v1/chat/completions"
    status, body = http(url, "POST", raw=b'{"model": "tiny", "messages": [')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = http(url, "POST", {"model": BASE_NAME})
    assert status == 400 and body["error"]["message"] == "messages: Field required"
    status, body = http(url, "POST", {"model": BASE_NAME, "messages": [{"role": "wizard", "content": "x"}]})
    assert status == 400 and "messages.0.role" in body["error"]["message"]
    assert http(f"{served.url}/v1/nothing-here")[0] == 404
    assert served.engine.running == 0  # nothing was left behind


def test_health_metrics_and_one_json_log_line_per_request(client, served, caplog):
    status, health = http(f"{served.url}/health")
    assert status == 200 and health["status"] == "ok" and health["model"] == BASE_NAME
    with caplog.at_level(logging.INFO, logger="lorakit.serve.access"):
        client.chat.completions.create(model="qv-r4", messages=[{"role": "user", "content": "log me"}], max_tokens=3,
                                       temperature=0)
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="missing", messages=[{"role": "user", "content": "x"}])
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "lorakit.serve.access"]
    assert [(line["path"], line["status"]) for line in lines] == [("/v1/chat/completions", 200),
                                                                   ("/v1/chat/completions", 404)]
    assert lines[0]["model"] == "qv-r4" and lines[0]["completion_tokens"] >= 1 and lines[0]["ttft_ms"] >= 0
    assert "does not exist" in lines[1]["error"]
    status, text = http(f"{served.url}/metrics")
    assert status == 200
    for name in ("lorakit_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"}",
                 "lorakit_generation_tokens_total", "lorakit_generation_tokens_per_second", "lorakit_queue_depth",
                 "lorakit_batch_size_bucket", "lorakit_adapter_cache_hits_total", "lorakit_adapter_loads_total",
                 "lorakit_time_to_first_token_seconds_count", "lorakit_adapters_registered 8"):
        assert name in text, name
