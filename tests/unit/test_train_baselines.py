"""finetuning_type baselines: lora trains only the adapter (the base stays bit-identical, up to the default
precision's bf16 storage), full trains every
weight, freeze trains the last N blocks (+ the head for SEQ_CLS); train_results.json counts them."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from lorakit.train.loop import run_training
from lorakit.train.setup import transformer_blocks
from tests.train_fixtures import (
    as_the_default_run_rounds_it, checkpoint_weights, format_rows, save_tiny_classifier, save_tiny_llama,
    tiny_run_config, write_rows,
)
from tests.train_fixtures import one_torch_thread  # noqa: F401  (an autouse fixture)


def results(tmp_path) -> dict:
    return json.loads((tmp_path / "run" / "train_results.json").read_text())


def base_weights(model_dir) -> dict[str, torch.Tensor]:
    return dict(AutoModelForCausalLM.from_pretrained(model_dir).named_parameters())


def test_lora_trains_only_the_adapter_and_leaves_the_base_untouched(tmp_path):
    result = run_training(tiny_run_config(tmp_path, "train.max_steps=3"), show_progress=False)
    trained = {n: p for n, p in result.model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    assert any(p.abs().sum() > 0 for n, p in trained.items() if ".lora_B." in n)  # B left its zero init
    summary = results(tmp_path)
    assert summary["trainable_params"] == result.trainable_params == sum(p.numel() for p in trained.values())
    assert summary["total_params"] == sum(p.numel() for p in result.model.parameters())
    assert summary["trainable_percent"] == pytest.approx(100 * summary["trainable_params"] / summary["total_params"],
                                                         abs=1e-4)
    # untouched but for the storage of the default precision: bf16 while training (where fast), the loaded dtype
    # again in the returned model (train/precision.py)
    original = dict(as_the_default_run_rounds_it(AutoModelForCausalLM.from_pretrained(tmp_path / "model"))
                    .named_parameters())
    base = dict(result.model.get_base_model().named_parameters())
    for name, value in original.items():
        match = [n for n in base if n.replace(".base_layer", "") == name]
        assert len(match) == 1, name
        assert base[match[0]].dtype == torch.float32 and torch.equal(base[match[0]], value), name


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied embeddings"])
def test_full_finetuning_trains_every_weight(tmp_path, tied):
    model_dir = save_tiny_llama(tmp_path / "model", tie_word_embeddings=tied)
    cfg = tiny_run_config(tmp_path, "finetuning_type=full", "adapter=null", "train.learning_rate=1e-3",
                          "train.max_steps=2", "train.save_steps=2", model=model_dir)
    result = run_training(cfg, show_progress=False)
    original = base_weights(model_dir)
    trained = dict(result.model.named_parameters())
    assert all(p.requires_grad for p in trained.values())
    assert results(tmp_path)["trainable_params"] == results(tmp_path)["total_params"] == \
        sum(p.numel() for p in trained.values())
    for name, value in original.items():
        assert not torch.equal(trained[name], value), f"{name} did not change"
    # the final model directory holds exactly the trained weights; the checkpoint holds them too
    saved = base_weights(tmp_path / "run" / "model")
    for name, value in trained.items():
        assert torch.equal(saved[name], value), name
    assert checkpoint_weights(tmp_path / "run" / "checkpoint-2").keys() == trained.keys()


def test_freeze_trains_only_the_last_blocks(tmp_path):
    cfg = tiny_run_config(tmp_path, "finetuning_type=freeze", "adapter=null", "train.freeze_trainable_layers=1",
                          "train.learning_rate=1e-3", "train.max_steps=2")
    result = run_training(cfg, show_progress=False)
    original = base_weights(tmp_path / "model")
    trained = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert trained == {n for n in original if n.startswith("model.layers.1.")}
    assert results(tmp_path)["trainable_params"] == sum(p.numel() for p in transformer_blocks(result.model)[-1:]
                                                       .parameters())
    for name, value in result.model.named_parameters():
        assert torch.equal(value, original[name]) == (name not in trained), name


def test_freeze_for_classification_also_trains_the_head(tmp_path):
    model_dir = save_tiny_classifier(tmp_path / "bert")
    data = write_rows(tmp_path / "labels.jsonl", format_rows("text_label", 16))
    cfg = tiny_run_config(tmp_path, "task_type=SEQ_CLS", "finetuning_type=freeze", "adapter=null",
                          "train.freeze_trainable_layers=1", "train.max_steps=2", model=model_dir, data=data)
    result = run_training(cfg, show_progress=False)
    trained = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert trained == {n for n, _ in result.model.named_parameters()
                       if n.startswith(("bert.encoder.layer.1.", "classifier."))}
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "model").num_labels == 3


def test_freeze_more_layers_than_the_model_has_is_refused(tmp_path):
    cfg = tiny_run_config(tmp_path, "finetuning_type=freeze", "adapter=null", "train.freeze_trainable_layers=5")
    with pytest.raises(ValueError, match=r"freeze_trainable_layers=5 but the model has only 2 blocks"):
        run_training(cfg, show_progress=False)
