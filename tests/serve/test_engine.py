"""The engine without HTTP: continuous batching of sequences for different adapters, equal to each alone."""

from __future__ import annotations

import queue
import warnings

import pytest
import torch

from lorakit.serve.engine import Engine, EngineSettings, Sequence
from lorakit.serve.sampling import SamplingParams
from tests.serve.support import chat_ids, raw_ids, tiny_model
from tests.tiny import tiny_gpt2, tiny_tokenizer

GREEDY = SamplingParams(max_tokens=12, temperature=0)


@pytest.fixture()
def engine_factory(adapter_dirs):
    engines = []

    def make(**settings) -> Engine:
        engine = Engine(tiny_model(), tiny_tokenizer(), EngineSettings(**{"max_model_len": 256, **settings}))
        for name, directory in adapter_dirs.items():
            engine.adapters.register(name, directory)
        engines.append(engine.start())
        return engine

    yield make
    for engine in engines:
        engine.stop()


def submit(engine: Engine, prompt, adapter, params=GREEDY) -> queue.Queue:
    outputs: queue.Queue = queue.Queue()
    if adapter is not None:
        engine.adapters.begin_request(adapter)
        engine.adapters.ensure_host(adapter)
    engine.submit(Sequence(prompt, adapter, params, outputs.put))
    return outputs


def collect(outputs: queue.Queue) -> tuple[list[int], str, int]:
    tokens = []
    while True:
        out = outputs.get(timeout=120)
        tokens += out.tokens
        if out.finish_reason:
            return tokens, out.finish_reason, out.completion_tokens


def test_a_mixed_stream_with_paging_equals_each_adapter_alone(engine_factory, references):
    """Nine models (8 adapters + base), 3 compute slots, 4 host copies, 5 cache rows, prompts prefilled in chunks of
    4 tokens: sequences wait for rows and slots, adapters are evicted and brought back; answers do not change."""
    engine = engine_factory(max_batch=5, max_loras=3, max_cpu_loras=4, prefill_chunk=4, prefill_tokens=8)
    moves = []
    move_row = engine.kv.move_row
    engine.kv.move_row = lambda *args: moves.append(args) or move_row(*args)  # rows are repacked as sequences end
    tokenizer = tiny_tokenizer()
    models = [None, *references.adapter_dirs]
    jobs = []
    for i in range(18):
        adapter = models[i % len(models)]
        prompt = chat_ids(tokenizer, "tell me " * (i % 3 + 1)) if i % 2 else raw_ids(tokenizer, f"prompt {i}:")
        jobs.append((adapter, prompt, submit(engine, prompt, adapter)))
    for adapter, prompt, outputs in jobs:
        tokens, reason, count = collect(outputs)
        assert tokens == references.ids(adapter, prompt, GREEDY.max_tokens), adapter
        assert reason == ("length" if len(tokens) == GREEDY.max_tokens else "stop")
        assert count == len(tokens) + (reason == "stop")
    metrics = engine.metrics
    assert metrics.adapter_evictions.value(tier="compute") > 0 and metrics.adapter_evictions.value(tier="host") > 0
    assert engine.adapters.stats()["compute"] <= 3
    assert engine.running == 0 and engine.waiting == 0 and moves


def test_gpt2_conv1d_layers_and_absolute_positions(tmp_path):
    """GPT-2: LoRA on Conv1D (weights stored transposed) and learned absolute position embeddings."""
    from lorakit import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(tiny_gpt2().double(), LoraConfig(r=4, target_modules=["c_attn", "c_proj"],
                                                                 init_lora_weights=False))
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            param.data.normal_(0, 0.5)
    peft_model.save_pretrained(str(tmp_path / "gpt2"))
    engine = Engine(tiny_gpt2().double(), tiny_tokenizer(), EngineSettings(max_model_len=100, prefill_chunk=3)).start()
    try:
        engine.adapters.register("gpt2", str(tmp_path / "gpt2"))
        params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
        prompt = raw_ids(tiny_tokenizer(), "hello world, hello")
        jobs = [(name, submit(engine, prompt, name, params)) for name in ("gpt2", None, "gpt2")]
        for name, outputs in jobs:
            reference = PeftModel.from_pretrained(tiny_gpt2().double(), str(tmp_path / "gpt2")) if name else \
                tiny_gpt2().double()
            ids = torch.tensor([prompt])
            expected = reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                                          min_new_tokens=10, do_sample=False, pad_token_id=0)[0, len(prompt):]
            assert collect(outputs)[0] == expected.tolist(), name
    finally:
        engine.stop()


def test_sequences_join_and_leave_a_running_batch(engine_factory, references):
    """Short sequences submitted while a long one decodes are admitted at once and finish long before it."""
    engine = engine_factory(max_batch=8)
    tokenizer = tiny_tokenizer()
    long_outputs: queue.Queue = queue.Queue()
    long = Sequence(raw_ids(tokenizer, "a long answer:"), None,
                    SamplingParams(max_tokens=200, temperature=0, ignore_eos=True), long_outputs.put)
    engine.submit(long)
    assert long_outputs.get(timeout=60).finish_reason is None  # decoding now
    seen_at_finish = []  # how far the long sequence was when each short one finished (read on the engine thread)
    short = []
    for i, adapter in enumerate(["qv-r4", None, "mlp-r2"]):
        prompt = raw_ids(tokenizer, f"short {i}")
        outputs: queue.Queue = queue.Queue()

        def on_output(out, outputs=outputs):
            if out.finish_reason:
                seen_at_finish.append(len(long.generated))
            outputs.put(out)

        if adapter:
            engine.adapters.begin_request(adapter)
            engine.adapters.ensure_host(adapter)
        engine.submit(Sequence(prompt, adapter, GREEDY, on_output))
        short.append((adapter, prompt, outputs))
    for adapter, prompt, outputs in short:
        tokens, _, _ = collect(outputs)
        assert tokens == references.ids(adapter, prompt, GREEDY.max_tokens)
    tokens, reason, _ = collect(long_outputs)
    assert reason == "length" and len(tokens) == 199  # the first token was read above
    assert len(seen_at_finish) == 3 and max(seen_at_finish) < 200


def test_seeded_sampling_repeats_and_top_p_keeps_the_top_token(engine_factory):
    engine = engine_factory()
    prompt = raw_ids(tiny_tokenizer(), "sample:")

    def sample(**params):
        return collect(submit(engine, prompt, "qv-r4", SamplingParams(max_tokens=16, ignore_eos=True, **params)))[0]

    assert sample(temperature=1.0, seed=5) == sample(temperature=1.0, seed=5)
    assert sample(temperature=1.0, seed=5) != sample(temperature=1.0, seed=6)
    assert sample(temperature=0.7, top_p=1e-6, seed=1) == sample(temperature=0)


def test_limits_and_finish_reasons(engine_factory):
    engine = engine_factory(max_model_len=64)
    prompt = raw_ids(tiny_tokenizer(), "x")
    tokens, reason, count = collect(submit(engine, prompt, None, SamplingParams(max_tokens=3, temperature=0,
                                                                                ignore_eos=True)))
    assert (len(tokens), reason, count) == (3, "length", 3)
    with pytest.raises(ValueError, match="more than the 64 tokens"):
        engine.check_fits(60, 5)
    with pytest.raises(ValueError, match="max_tokens must be an integer >= 1"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=3)


def test_a_failing_step_fails_its_sequences_and_the_engine_goes_on(engine_factory, monkeypatch, caplog):
    engine = engine_factory()
    prompt = raw_ids(tiny_tokenizer(), "fail once")
    forward = engine.model.forward
    calls = {"n": 0}

    def failing_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated failure")
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", failing_once)
    tokens, reason, _ = collect(submit(engine, prompt, "o-r3"))
    assert reason == "error" and tokens == []
    tokens, reason, _ = collect(submit(engine, prompt, "o-r3"))
    assert reason in ("stop", "length")
    assert engine.adapters.resident()["o-r3"] == "compute"
    assert "engine step failed" in caplog.text


def test_models_the_engine_cannot_serve_are_refused():
    from tests.tiny import tiny_t5

    with pytest.raises(ValueError, match="decoder-only"):
        Engine(tiny_t5(), tiny_tokenizer())
    model = tiny_model()
    model.config.layer_types = ["sliding_attention", "full_attention"]
    with pytest.raises(ValueError, match="full-attention models only"):
        Engine(model, tiny_tokenizer())


def test_the_cache_goes_in_under_the_models_own_argument(engine_factory, references):
    """transformers 5.24 renamed `past_key_values` to `cache` and warns on the old name (removed in 5.40): the
    engine passes the name the model's forward takes, so serving raises no deprecation warning."""
    engine = engine_factory()
    prompt = raw_ids(tiny_tokenizer(), "hello")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokens, _, _ = collect(submit(engine, prompt, None))
    assert tokens == references.ids(None, prompt, GREEDY.max_tokens)
    assert not [w for w in caught if "past_key_values" in str(w.message)]
