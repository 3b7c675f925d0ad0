"""Adapters on disk, in host memory and in compute slots: what loads, what is refused, budgets, a thousand adapters."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil

import peft
import pytest
import torch

from lorakit import LoraConfig, get_peft_model
from lorakit.serve.adapter_cache import AdapterCache, AdapterInUse, AdapterNotFound
from lorakit.serve.adapter_weights import AdapterLoadError, ModelLayers, load_serving_adapter
from lorakit.serve.engine import Engine, EngineSettings
from lorakit.serve.metrics import Metrics
from lorakit.serve.sampling import SamplingParams
from tests.serve.support import References, chat_ids, http, make_adapter, raw_ids, start_server, tiny_model
from tests.serve.test_engine import collect, submit
from tests.tiny import tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def layers() -> ModelLayers:
    return ModelLayers(tiny_model())


def edited_copy(source: str, target: str, **config_changes) -> str:
    shutil.copytree(source, target)
    path = os.path.join(target, "adapter_config.json")
    with open(path) as fh:
        config = json.load(fh)
    config.update(config_changes)
    with open(path, "w") as fh:
        json.dump(config, fh)
    return target


def test_lora_variants_load_with_scaling_folded_in(adapter_dirs, layers):
    adapter = load_serving_adapter("pattern", adapter_dirs["pattern"], layers)
    q, v, down = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.0.mlp.down_proj"
    assert adapter.modules[q][0].shape == (8, 32) and adapter.modules[down][0].shape == (1, 64)  # rank_pattern
    weights = peft.utils.load_peft_weights(adapter_dirs["pattern"])  # the file, read by PEFT itself
    b = weights[f"base_model.model.{v}.lora_B.weight"]
    torch.testing.assert_close(adapter.modules[v][1], b * (64 / 4))  # alpha_pattern: 64 / r
    rs = load_serving_adapter("rs", adapter_dirs["rslora-r16"], layers)
    module = "model.layers.0.self_attn.k_proj"
    b = peft.utils.load_peft_weights(adapter_dirs["rslora-r16"])[f"base_model.model.{module}.lora_B.weight"]
    torch.testing.assert_close(rs.modules[module][1], b * (4 / 16 ** 0.5))  # rsLoRA: alpha / sqrt(r)
    assert set(load_serving_adapter("l1", adapter_dirs["layer1-r1"], layers).modules) == {
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}


@pytest.mark.filterwarnings("ignore::FutureWarning")  # raised inside HF PEFT
def test_an_adapter_written_by_peft_serves_as_peft_runs_it(tmp_path):
    torch.manual_seed(3)
    model = peft.get_peft_model(tiny_model(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"],
                                                              init_lora_weights=False, task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "peft-made")
    reference = peft.PeftModel.from_pretrained(tiny_model(), str(tmp_path / "peft-made")).eval()
    prompt = raw_ids(tiny_tokenizer(), "from peft:")
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        expected = reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                                      min_new_tokens=10, do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
    engine = Engine(tiny_model(), tiny_tokenizer(), EngineSettings(max_model_len=64)).start()
    try:
        engine.adapters.register("peft-made", str(tmp_path / "peft-made"))
        tokens, _, _ = collect(submit(engine, prompt, "peft-made",
                                      SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)))
    finally:
        engine.stop()
    assert tokens == expected


REFUSED = [
    (dict(use_dora=True), "DoRA"),
    (dict(peft_type="VERA", r=4), "VERA"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(bias="all"), "biases"),
    (dict(task_type="SEQ_CLS"), "SEQ_CLS"),
    (dict(target_modules=["q_proj", "v_proj", "k_proj"]), "does not match its adapter_config.json"),
]


@pytest.mark.parametrize("changes, message", REFUSED, ids=[m for _, m in REFUSED])
def test_adapters_the_kernel_cannot_batch_are_refused_clearly(adapter_dirs, layers, tmp_path, changes, message):
    directory = edited_copy(adapter_dirs["qv-r4"], str(tmp_path / "edited"), **changes)
    with pytest.raises(AdapterLoadError, match=message):
        load_serving_adapter("edited", directory, layers)


def test_bad_files_are_refused_clearly(adapter_dirs, layers, tmp_path):
    embedding = make_adapter(str(tmp_path / "embedding"), r=2, target_modules=["embed_tokens", "q_proj"])
    # (the file also holds the full embedding weight: PEFT saves it when an embedding layer is targeted)
    with pytest.raises(AdapterLoadError, match=r"(lora_embedding_A|embed_tokens\.base_layer\.weight).*cannot use"):
        load_serving_adapter("e", embedding, layers)
    other_base = tmp_path / "other-base"
    get_peft_model(tiny_llama(hidden_size=48), LoraConfig(target_modules=["q_proj"])).save_pretrained(str(other_base))
    with pytest.raises(AdapterLoadError, match=r"has lora_A \(8, 48\).*needs \(8, 32\)"):
        load_serving_adapter("o", str(other_base), layers)
    corrupt = edited_copy(adapter_dirs["qv-r4"], str(tmp_path / "corrupt"))
    with open(os.path.join(corrupt, "adapter_model.safetensors"), "wb") as fh:
        fh.write(b"\x00garbage" * 10)
    with pytest.raises(AdapterLoadError, match="not a readable safetensors file"):
        load_serving_adapter("c", corrupt, layers)
    pickled = edited_copy(adapter_dirs["qv-r4"], str(tmp_path / "pickled"))
    os.rename(os.path.join(pickled, "adapter_model.safetensors"), os.path.join(pickled, "adapter_model.bin"))
    with pytest.raises(AdapterLoadError, match="pickle"):
        load_serving_adapter("p", pickled, layers)
    nan = tmp_path / "nan"
    model = get_peft_model(tiny_model(), LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    next(p for n, p in model.named_parameters() if "lora_B" in n).data[0, 0] = float("nan")
    model.save_pretrained(str(nan))
    with pytest.raises(AdapterLoadError, match="NaN"):
        load_serving_adapter("n", str(nan), layers)


def test_slots_and_host_copies_follow_lru_within_their_budgets(adapter_dirs, layers):
    cache = AdapterCache(layers, max_loras=2, max_cpu_loras=3, metrics=Metrics())
    writes = []
    cache.slot_writer = lambda slot, adapter: writes.append((slot, adapter.name))
    names = ["qv-r4", "mlp-r2", "o-r3", "all-r8"]
    for name in names:
        cache.register(name, adapter_dirs[name])

    def lease(name):
        cache.begin_request(name)
        cache.ensure_host(name)

    for name in names[:3]:
        lease(name)
    assert cache.acquire_slot("qv-r4") == 1 and cache.acquire_slot("mlp-r2") == 2
    assert cache.acquire_slot("o-r3") is None  # both slots pinned by running sequences
    cache.release_slot("qv-r4")
    assert cache.acquire_slot("o-r3", may_load=False) is None  # a blocked queue may not take new slots
    assert cache.acquire_slot("o-r3") == 1  # the idle slot is reused
    assert writes == [(1, "qv-r4"), (2, "mlp-r2"), (1, "o-r3")]
    assert cache.acquire_slot("mlp-r2") == 2  # already resident: a hit, no write
    assert len(writes) == 3 and cache.metrics.adapter_hits.value(tier="compute") == 1
    for name in names[:3]:
        cache.end_request(name)
    lease("all-r8")  # a fourth host copy: the least recently used idle one without a slot ("qv-r4") goes
    assert cache.resident() == {"qv-r4": "disk", "mlp-r2": "compute", "o-r3": "compute", "all-r8": "host"}
    with pytest.raises(AdapterNotFound):
        cache.begin_request("unknown")
    with pytest.raises(AdapterInUse, match="still used by 1 request"):
        cache.unload("all-r8", timeout=0)
    assert "all-r8" in cache  # a failed unload leaves the adapter usable
    cache.end_request("all-r8")
    cache.unload("all-r8", timeout=0)
    assert "all-r8" not in cache and cache.stats()["registered"] == 3
    with pytest.raises(ValueError, match="max_cpu_loras"):
        AdapterCache(layers, max_loras=4, max_cpu_loras=2, metrics=Metrics())


def test_a_thousand_registered_adapters_with_eight_hot(tmp_path):
    """1000 adapter directories (10 distinct adapters, 100 copies each) are registered without reading any; a
    sample of 40 served concurrently loads exactly those, keeps 8 in compute slots and 16 in host memory, and
    each answers as its adapter alone."""
    sources = {f"src{i}": make_adapter(str(tmp_path / "sources" / f"src{i}"), seed=i, r=1 + i % 3,
                                       target_modules=["q_proj", "v_proj"]) for i in range(10)}
    root = tmp_path / "adapters"
    for n in range(1000):
        shutil.copytree(sources[f"src{n % 10}"], root / f"adapter-{n:04d}")
    running, thread = start_server(str(root), engine={"max_loras": 8, "max_cpu_loras": 16})
    try:
        engine = running.engine
        assert engine.adapters.stats() == {"registered": 1000, "host": 0, "compute": 0, "max_loras": 8,
                                           "max_cpu_loras": 16}
        status, models = http(f"{running.url}/v1/models")
        assert status == 200 and len(models["data"]) == 1001
        sample = [n * 25 + n % 7 for n in range(40)]
        tokenizer = tiny_tokenizer()

        def ask(n):
            return http(f"{running.url}/v1/chat/completions", "POST", {
                "model": f"adapter-{n:04d}", "messages": [{"role": "user", "content": f"hi {n % 3}"}],
                "max_tokens": 6, "temperature": 0})

        with concurrent.futures.ThreadPoolExecutor(40) as pool:
            answers = list(pool.map(ask, sample))
        references = References(sources)
        for n, (status, answer) in zip(sample, answers):
            assert status == 200, answer
            prompt = chat_ids(tokenizer, f"hi {n % 3}")
            assert answer["choices"][0]["message"]["content"] == references.text(f"src{n % 10}", prompt, 6)
        stats = engine.adapters.stats()
        assert stats["registered"] == 1000 and stats["compute"] <= 8 and stats["host"] <= 16
        assert engine.metrics.adapter_loads.value(source="disk") == 40
        assert sum(a.nbytes for a in _host_copies(engine.adapters)) < 16 * 10_000  # tiny adapters, 16 at most
    finally:
        thread.stop()
        running.server.close()


def _host_copies(cache: AdapterCache):
    return [e.host for e in cache._entries.values() if e.host is not None]
