"""A bf16 checkpoint's weights loaded as stored (models/stored_bf16.py) for a bf16 adapter run: views of the
mapped file instead of fp32 copies, and a run that is the fp32-loaded run bit for bit, for every kind of
parameter the run treats differently (trained, frozen in bf16, kept fp32 by a training hook, tied, rewritten by
an init)."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from lorakit.file_pages import FileMappings
from lorakit.methods.quant import quantize_model, quantized_layers
from lorakit.models import loading, stored_bf16
from lorakit.models.loading import TASK_AUTO_CLASSES, load_model_and_tokenizer
from lorakit.models.stored_bf16 import checkpoint_dtypes
from lorakit.train.config import load_run_config
from lorakit.train import loop
from lorakit.train.loop import run_training
from lorakit.train.setup import load_training_model
from lorakit.train.resume import weights_hash
from tests.tiny import tiny_bert_classifier, tiny_gpt2, tiny_llama, tiny_t5, tiny_tokenizer
from tests.train_fixtures import (  # noqa: F401  (one_torch_thread: an autouse fixture)
    assert_same_tensors,
    base_run_dict,
    default_run_is_bf16,
    one_torch_thread,
    train_losses,
    trained_weights,
)


def save_bf16_llama(directory) -> str:
    directory = str(directory)
    tiny_llama().to(torch.bfloat16).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def test_a_bf16_checkpoint_loads_as_views_of_the_file_with_the_fp32_loads_values(tmp_path):
    directory = save_bf16_llama(tmp_path / "model")
    assert checkpoint_dtypes(directory, {}) == {"BF16"}
    stored, _ = load_model_and_tokenizer(directory, device="cpu", bf16_as_stored=True)
    fp32, _ = load_model_and_tokenizer(directory, device="cpu")  # as stored, then fp32 weight by weight
    usual = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)  # transformers' fp32 load
    mappings = FileMappings.read()
    assert {p.dtype for p in stored.parameters()} == {torch.bfloat16}
    assert all(mappings.holds(p) for p in stored.parameters())  # no copy was made
    assert not any(mappings.holds(p) for p in fp32.parameters())
    reference = usual.state_dict()
    assert {n: t.dtype for n, t in fp32.state_dict().items()} == {n: t.dtype for n, t in reference.items()}
    assert_same_tensors(fp32.state_dict(), reference)
    for (name, a), (_, b) in zip(stored.state_dict().items(), reference.items()):
        assert torch.equal(a.to(b.dtype), b), name
    assert weights_hash(stored, torch.float32) == weights_hash(usual)


@pytest.mark.parametrize("task", ["CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS"])
def test_every_task_types_fp32_load_of_a_bf16_checkpoint_is_transformers_own(tmp_path, task):
    """GPT-2 (Conv1D, tied head), T5 (weights transformers keeps in fp32) and a BERT classifier (a fresh head: not
    in the checkpoint, so loaded as before): the state dict of transformers' fp32 load, dtypes included."""
    build = {"CAUSAL_LM": tiny_gpt2, "SEQ_2_SEQ_LM": tiny_t5, "SEQ_CLS": lambda: tiny_bert_classifier(num_labels=3)}
    directory = str(tmp_path / task)
    build[task]().to(torch.bfloat16).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    options = {"num_labels": 3} if task == "SEQ_CLS" else {}
    torch.manual_seed(0)  # the classifier's fresh head
    model, _ = load_model_and_tokenizer(directory, task, device="cpu", **options)
    torch.manual_seed(0)
    reference = TASK_AUTO_CLASSES[task].from_pretrained(directory, dtype=torch.float32, **options).state_dict()
    assert {n: t.dtype for n, t in model.state_dict().items()} == {n: t.dtype for n, t in reference.items()}
    assert_same_tensors(model.state_dict(), reference)


def test_anything_else_loads_as_usual(tmp_path, monkeypatch):
    fp32 = str(tmp_path / "fp32")
    tiny_llama().save_pretrained(fp32)
    tiny_tokenizer().save_pretrained(fp32)
    assert checkpoint_dtypes(fp32, {}) == {"F32"}
    model, _ = load_model_and_tokenizer(fp32, device="cpu", bf16_as_stored=True)
    assert {p.dtype for p in model.parameters()} == {torch.float32}

    # a weight missing from the checkpoint would be initialised, in bf16, not loaded: the fp32 load instead
    incomplete = save_bf16_llama(tmp_path / "incomplete")
    weights = load_file(os.path.join(incomplete, "model.safetensors"))
    del weights["model.layers.0.mlp.up_proj.weight"]
    save_file(weights, os.path.join(incomplete, "model.safetensors"), metadata={"format": "pt"})
    model, _ = load_model_and_tokenizer(incomplete, device="cpu", bf16_as_stored=True)
    assert {p.dtype for p in model.parameters()} == {torch.float32}

    # a file safetensors cannot read: nothing read here; the usual load says what is wrong, as before
    broken = save_bf16_llama(tmp_path / "broken")
    with open(os.path.join(broken, "model.safetensors"), "r+b") as fh:
        fh.write(b"\xff" * 16)
    assert checkpoint_dtypes(broken, {}) == set()

    # a Hub id that is not in the local cache: nothing to read (not the working directory's files)
    monkeypatch.chdir(incomplete)
    assert checkpoint_dtypes("someone/not-cached-here", {}) == set()

    # an explicit dtype is what the caller gets
    bf16 = save_bf16_llama(tmp_path / "bf16")
    model, _ = load_model_and_tokenizer(bf16, dtype="float32", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_a_qlora_load_quantizes_the_weights_as_stored_to_the_same_model(tmp_path, monkeypatch):
    """QLoRA from a bf16 checkpoint: quantized from the mapped file, not from fp32 copies; the same codes, scales,
    recorded dtype and fp32 dense layers as quantizing the fp32 load."""
    directory = save_bf16_llama(tmp_path / "model")
    kept = []

    def spy(*args):
        kept.append(stored_bf16.load_stored_bf16(*args))
        return kept[-1]

    monkeypatch.setattr(loading, "load_stored_bf16", spy)
    model, _ = load_model_and_tokenizer(directory, device="cpu", quantization="nf4")
    assert kept and kept[0] is model  # loaded as stored
    reference = quantize_model(AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32), "nf4")
    a, b = model.state_dict(), reference.state_dict()
    assert {n: t.dtype for n, t in a.items()} == {n: t.dtype for n, t in b.items()}
    assert_same_tensors(a, b)
    layers, reference_layers = dict(quantized_layers(model)), dict(quantized_layers(reference))
    assert layers.keys() == reference_layers.keys() and layers
    for name, layer in layers.items():
        assert layer.weight_dtype == reference_layers[name].weight_dtype == torch.float32, name
        assert torch.equal(layer.dequantized_weight(), reference_layers[name].dequantized_weight()), name


RUNS = {
    "lora": ((), {}),
    "dora": ((), {"adapter": {"use_dora": True}}),
    "pissa": ((), {"adapter": {"init_lora_weights": "pissa"}}),  # rewrites the base weights at init
    "bias and a saved module": ((), {"adapter": {"bias": "all", "modules_to_save": ["lm_head"]}}),
    "lora-fa": (("train.lora_fa=true",), {}),
    "vera": ((), {"adapter": {"method": "vera", "r": 8, "target_modules": ["q_proj", "v_proj"]}}),
    "adalora": ((), {"adapter": {"method": "adalora", "init_r": 6, "target_r": 4, "target_modules": ["q_proj"]}}),
    "relora": (("train.relora_steps=2",), {}),  # merges into base weights kept in fp32
    "delta-lora": (("train.delta_lora_lambda=0.5",), {}),
    "qlora": ((), {"quantization": "nf4"}),  # quantized from the file as stored in both runs; dense layers differ
}


@pytest.mark.skipif(not default_run_is_bf16(), reason="the default run is fp32 on this CPU: nothing loads as stored")
@pytest.mark.parametrize("kind", sorted(RUNS))
def test_a_run_on_the_weights_as_stored_is_the_fp32_loaded_run(tmp_path, monkeypatch, kind):
    """The default run (dtype unset: fp32, bf16 where fast) loads the bf16 checkpoint as stored; the same run
    with model dtype float32 loads fp32 copies. Same losses, same trained tensors, and the same returned model
    (fp32, the frozen weights holding the bf16 values), bit for bit."""
    overrides, base = RUNS[kind]
    model_dir = save_bf16_llama(tmp_path / "model")
    results, loaded_dtypes = {}, []

    def spy(*args):
        loaded = load_training_model(*args)
        loaded_dtypes.append(loaded[2])
        return loaded

    monkeypatch.setattr(loop, "load_training_model", spy)
    for name, dtype in (("as stored", None), ("fp32 copies", "float32")):
        raw = base_run_dict(tmp_path, model=model_dir, output=name.replace(" ", "_"))
        adapter = base.get("adapter", {})
        raw["adapter"] = adapter if "method" in adapter else {**raw["adapter"], **adapter}  # another method: its own
        raw.update({key: value for key, value in base.items() if key != "adapter"})
        if dtype:
            raw["dtype"] = dtype
        results[name] = run_training(load_run_config(None, list(overrides), base=raw), show_progress=False)
    assert loaded_dtypes == [torch.float32, None]  # the first run's weights were the checkpoint's, as stored
    stored, copies = results["as stored"], results["fp32 copies"]
    assert train_losses(stored.output_dir) == train_losses(copies.output_dir)
    assert_same_tensors(trained_weights(stored.model), trained_weights(copies.model))
    a, b = stored.model.state_dict(), copies.model.state_dict()
    assert {n: t.dtype for n, t in a.items()} == {n: t.dtype for n, t in b.items()}
    assert_same_tensors(a, b)


@pytest.mark.skipif(not default_run_is_bf16(), reason="the default run is fp32 on this CPU: nothing loads as stored")
def test_a_run_that_returns_no_model_saves_the_same_adapter_without_building_the_fp32_model(tmp_path, monkeypatch):
    """`lorakit train` takes no model back (return_model=False): the frozen weights stay as stored at the end."""
    model_dir = save_bf16_llama(tmp_path / "model")
    restored = []
    monkeypatch.setattr(loop.precision, "restore_stored_dtypes", lambda model, stored: restored.append(len(stored)))
    results = {}
    for return_model in (False, True):
        raw = base_run_dict(tmp_path, model=model_dir, output=f"returned_{return_model}")
        results[return_model] = run_training(load_run_config(None, [], base=raw), show_progress=False,
                                             return_model=return_model)
    assert results[False].model is None and results[True].model is not None
    assert len(restored) == 1 and restored[0] > 0  # only the run returning its model gave fp32 back
    saved = {flag: load_file(os.path.join(result.output_dir, "adapter", "adapter_model.safetensors"))
             for flag, result in results.items()}
    assert_same_tensors(saved[False], saved[True])
