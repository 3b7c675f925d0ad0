"""The README.md model card save_pretrained writes beside an adapter (lorakit.integrations.model_card)."""

from __future__ import annotations

import os

import torch
import yaml

from lorakit import AdaLoraConfig, LoraConfig, PeftModel, get_peft_model
from lorakit.integrations.model_card import CARD_MARKER, CardFacts, TrainingInfo, render_model_card
from lorakit.models import SMOLLM2
from tests.tiny import tiny_bert_classifier, tiny_llama


def metadata(card: str) -> dict:
    return yaml.safe_load(card.split("---")[1])


def test_card_names_the_base_method_and_its_settings(tmp_path):
    base = tiny_llama()
    base.config.name_or_path = "someone/tiny-llama"
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], use_dora=True,
                                            task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert metadata(card) == {"library_name": "peft", "base_model": "someone/tiny-llama",
                              "tags": ["base_model:adapter:someone/tiny-llama", "lora", "lorakit"],
                              "pipeline_tag": "text-generation"}
    assert CARD_MARKER in card and "# LoRA adapter for someone/tiny-llama" in card
    for row in ("| r | 16 |", "| lora_alpha | 32 |", "| target_modules | `q_proj`, `v_proj` |", "| use_dora | True |"):
        assert row in card
    assert "lora_dropout" not in card  # at its default
    trainable, total = model.get_nb_trainable_parameters()
    assert f"Adapter parameters: {trainable:,}" in card and f"{total:,} parameters" in card
    assert "## Training" not in card  # nothing is known about it
    assert 'AutoModelForCausalLM.from_pretrained("someone/tiny-llama")' in card
    assert "lorakit generate --adapter path/to/this/adapter --prompt" in card


def test_a_local_base_model_stays_out_of_the_metadata(tmp_path):
    base = tiny_bert_classifier()
    base.config.name_or_path = str(tmp_path / "my-bert")
    os.makedirs(tmp_path / "my-bert")
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["query"], task_type="SEQ_CLS"))
    model.save_pretrained(tmp_path / "adapter")
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert metadata(card) == {"library_name": "peft", "tags": ["lora", "lorakit"], "pipeline_tag": "text-classification"}
    assert "`my-bert` (a local directory)" in card and str(tmp_path) not in card
    assert "AutoModelForSequenceClassification" in card and "lorakit generate" not in card


def test_a_loaded_adapter_counts_its_tensors_and_the_card_is_rewritten(tmp_path):
    torch.manual_seed(0)
    get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "a")
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a"))  # frozen: nothing trainable
    loaded.save_pretrained(tmp_path / "a")
    assert "Adapter parameters: 512 " in (tmp_path / "a" / "README.md").read_text()  # 2 layers x (4x32 + 32x4)


def test_a_readme_lorakit_did_not_write_keeps_its_text(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: mit\ntags:\n- mine\n---\n\n# My adapter\n\nHand written.\n")
    base = tiny_llama()
    base.config.name_or_path = "someone/tiny-llama"
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")).save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "Hand written." in card and CARD_MARKER not in card and "## Method" not in card
    assert metadata(card) == {"license": "mit", "tags": ["mine", "base_model:adapter:someone/tiny-llama", "lora",
                                                         "lorakit"],
                              "library_name": "peft", "base_model": "someone/tiny-llama",
                              "pipeline_tag": "text-generation"}


def test_training_information_and_the_embedded_copy():
    config = AdaLoraConfig(init_r=12, target_r=4, total_step=100, target_modules=["q_proj"], task_type="CAUSAL_LM",
                           base_model_name_or_path=SMOLLM2.hub_id)
    training = TrainingInfo(trainer="trl SFTTrainer", data=["imdb, 1,000 examples"], steps=40, epochs=2.0,
                            settings={"learning_rate": 2e-4}, metrics={"train_loss": 1.23456, "eval_loss": 1.5},
                            metrics_note="best checkpoint (step 30, by eval_loss)")
    card = render_model_card(CardFacts(configs={"default": config}, base_model=SMOLLM2.hub_id, embedded_copy=SMOLLM2,
                                       training=training, repo_id="me/ada"))
    assert "# AdaLoRA adapter for HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "| init_r | 12 |" in card and "| target_r | 4 |" in card and "| total_step | 100 |" in card
    assert "lorakit's embedded copy of HuggingFaceTB/SmolLM2-135M-Instruct (its Q4_1 GGUF build" in card
    for line in ("- trained with: trl SFTTrainer", "- data: imdb, 1,000 examples", "- optimizer steps: 40 (2 epochs)",
                 "- learning rate: 0.0002", "| train_loss | 1.235 |", "| eval_loss | 1.5 |",
                 "Evaluation metrics: best checkpoint (step 30, by eval_loss).",
                 'PeftModel.from_pretrained(base, "me/ada")', "lorakit generate --adapter me/ada --prompt"):
        assert line in card, line
    assert "adalora" in metadata(card)["tags"]
