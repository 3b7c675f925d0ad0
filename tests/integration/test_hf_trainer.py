"""transformers' Trainer on lorakit models (lorakit.integrations.Trainer; docs/integrations.md), end to end on the
tiny Llama: eval_loss, PEFT-format adapter files in every checkpoint and at the end, load_best_model_at_end,
resume_from_checkpoint, training hooks."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers
from transformers import DataCollatorForLanguageModeling, DataCollatorWithPadding, TrainingArguments

import lorakit
from lorakit.integrations import Trainer, adapter_trainer
from tests.integration.trainer_support import (
    IDS,
    adapter_weights,
    assert_loads_in_peft,
    assert_same_weights,
    eval_losses,
    lora_model,
    quick_args,
    text_dataset,
)
from tests.tiny import tiny_bert_classifier, tiny_llama, tiny_tokenizer
from tests.train_fixtures import one_torch_thread  # noqa: F401  (autouse)


def build(trainer_cls, model, output_dir, tokenizer=None, **overrides):
    tokenizer = tokenizer or tiny_tokenizer()
    data = text_dataset(tokenizer)
    return trainer_cls(model=model, args=TrainingArguments(**quick_args(output_dir, **overrides)), train_dataset=data,
                       eval_dataset=data.select(range(8)), processing_class=tokenizer,
                       data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))


def test_plain_transformers_trainer_trains_with_default_arguments(tmp_path):
    """Without the integration, transformers' own Trainer keeps the dataset's columns (remove_unused_columns is on by
    default) and finds the labels, so it trains and reports eval_loss: PeftModel.forward shows the wrapped model's
    parameters. Its checkpoints then hold the whole model, which the integration replaces by adapter files."""
    model = lora_model()
    before = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    trainer = build(transformers.Trainer, model, tmp_path, save_strategy="no")
    trainer.train()
    assert sorted(eval_losses(trainer)) == [3, 6]
    assert any(not torch.equal(before[k], v) for k, v in model.adapter_state_dict().items())


def test_checkpoints_and_final_save_are_peft_adapters(tmp_path):
    model = lora_model()
    trainer = build(Trainer, model, tmp_path)
    assert trainer.model is model and trainer.label_names == ["labels"]
    trainer.train()
    trainer.save_model()
    assert sorted(eval_losses(trainer)) == [3, 6]
    logits = {name: assert_loads_in_peft(tmp_path / name) for name in ("checkpoint-3", "checkpoint-6", ".")}
    with torch.no_grad():
        live = model.eval()(input_ids=IDS).logits
    torch.testing.assert_close(logits["."], live, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits["checkpoint-6"], live, rtol=0, atol=1e-5)
    assert not torch.allclose(logits["checkpoint-3"], live, atol=1e-4)  # it did train between the checkpoints
    assert os.path.isfile(tmp_path / "tokenizer.json") and os.path.isfile(tmp_path / "checkpoint-3" / "optimizer.pt")
    card = (tmp_path / "README.md").read_text()
    assert "transformers Trainer" in card and "eval_loss" in card and "library_name: peft" in card


def test_load_best_model_at_end_restores_the_best_checkpoint(tmp_path):
    """The "best" checkpoint here is the one with the highest eval loss (the first: the loss falls), so that loading
    it is visible: the model ends with checkpoint-3's weights, not with its own last ones."""
    model = lora_model()
    trainer = build(Trainer, model, tmp_path, load_best_model_at_end=True, metric_for_best_model="eval_loss",
                    greater_is_better=True)
    trainer.train()
    losses = eval_losses(trainer)
    assert losses[3] > losses[6] and trainer.state.best_model_checkpoint.endswith("checkpoint-3")
    final = {k.replace(".default", ""): v for k, v in model.adapter_state_dict().items()}
    assert_same_weights(final, adapter_weights(tmp_path / "checkpoint-3"))
    assert not torch.allclose(next(iter(final.values())), next(iter(adapter_weights(tmp_path / "checkpoint-6").values())))
    trainer.save_model()
    card = (tmp_path / "README.md").read_text()
    assert "best checkpoint (step 3, by eval_loss)" in card and f"{losses[3]:.4g}" in card


def test_resume_from_checkpoint_continues_the_run_exactly(tmp_path):
    uninterrupted = build(Trainer, lora_model(), tmp_path / "a")
    uninterrupted.train()
    resumed_model = lora_model(seed=1)  # other initial weights: all of them must come from the checkpoint
    resumed = build(Trainer, resumed_model, tmp_path / "b")
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert resumed.state.global_step == 6
    assert eval_losses(resumed)[6] == pytest.approx(eval_losses(uninterrupted)[6], abs=1e-6)
    assert_same_weights(adapter_weights(tmp_path / "b" / "checkpoint-6"), adapter_weights(tmp_path / "a" / "checkpoint-6"))


def test_resume_refuses_a_checkpoint_without_the_adapter(tmp_path):
    trainer = build(Trainer, lora_model(), tmp_path)
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="active adapter"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))


def test_sequence_classification_with_its_head(tmp_path):
    """SEQ_CLS: the Trainer finds the labels, evaluates, and the checkpoint (adapter + trained head) loads in PEFT."""
    tokenizer = tiny_tokenizer(chat_template=False)
    rows = [f"item {i} is {['bad', 'fine', 'good'][i % 3]}" for i in range(24)]
    from datasets import Dataset

    data = Dataset.from_dict({"text": rows, "label": [i % 3 for i in range(24)]}).map(
        lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"])
    torch.manual_seed(0)
    model = lorakit.get_peft_model(tiny_bert_classifier(), lorakit.LoraConfig(r=4, target_modules=["query", "value"],
                                                                              task_type="SEQ_CLS"))
    trainer = Trainer(model=model, args=TrainingArguments(**quick_args(tmp_path)), train_dataset=data,
                      eval_dataset=data.select(range(6)), data_collator=DataCollatorWithPadding(tokenizer))
    trainer.train()
    assert sorted(eval_losses(trainer)) == [3, 6]
    assert any(k.startswith("base_model.model.classifier") for k in adapter_weights(tmp_path / "checkpoint-6"))
    assert_loads_in_peft(tmp_path / "checkpoint-6", build=tiny_bert_classifier)


def test_tied_embeddings_checkpoint(tmp_path):
    """transformers' Trainer saves a non-PEFT model's state dict with safetensors, which refuses the tied input and
    output embeddings of models such as SmolLM2; lorakit's saves the adapter."""
    model = lora_model()
    tied = lorakit.get_peft_model(tiny_llama(tie_word_embeddings=True), model.peft_config["default"])
    build(Trainer, tied, tmp_path, max_steps=3, eval_strategy="no").train()
    assert_loads_in_peft(tmp_path / "checkpoint-3", build=lambda: tiny_llama(tie_word_embeddings=True))


def test_a_model_without_lorakit_adapters_trains_as_with_transformers(tmp_path):
    trainer = build(Trainer, tiny_llama(), tmp_path, max_steps=3, eval_strategy="no")
    trainer.train()
    assert os.path.isfile(tmp_path / "checkpoint-3" / "model.safetensors")
    assert not os.path.exists(tmp_path / "checkpoint-3" / "adapter_config.json")


def test_adalora_budget_is_allocated_by_the_trainer(tmp_path):
    """AdaLoRA's rank allocation runs from the Trainer (a callback drives the method's training hooks): by the end
    the rank pattern exists and is saved; resuming such an adapter and load_best_model_at_end are refused clearly."""
    torch.manual_seed(0)
    config = lorakit.AdaLoraConfig(init_r=4, target_r=2, tinit=1, tfinal=1, deltaT=1, total_step=6,
                                   target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = lorakit.get_peft_model(tiny_llama(), config)
    trainer = build(Trainer, model, tmp_path)
    trainer.train()
    pattern = model.peft_config["default"].rank_pattern
    assert pattern and sum(sum(kept) for kept in pattern.values()) < 4 * len(pattern)  # ranks were cut
    saved = json.loads((tmp_path / "checkpoint-6" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == pattern
    with pytest.raises(ValueError, match="resume_from_checkpoint is not supported for AdaLoRA"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    with pytest.raises(ValueError, match="load_best_model_at_end is not supported for AdaLoRA"):
        build(Trainer, lorakit.get_peft_model(tiny_llama(), config), tmp_path / "b", load_best_model_at_end=True)


def test_adapter_trainer_takes_only_trainer_classes():
    with pytest.raises(TypeError, match="transformers.Trainer or a subclass"):
        adapter_trainer(dict)
    assert adapter_trainer(Trainer) is Trainer and issubclass(Trainer, transformers.Trainer)
