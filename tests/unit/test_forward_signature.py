"""What inspect.signature shows for PeftModel.forward (integrations/signature.py): the wrapped model's inputs on a
model, `labels` on the class, with the call itself unchanged."""

from __future__ import annotations

import copy
import inspect

import torch
from transformers.utils.generic import can_return_loss, find_labels

from lorakit import LoraConfig, PeftModel, get_peft_model
from tests.tiny import tiny_bert_classifier, tiny_llama

IDS = torch.tensor([[5, 9, 30, 31]])


def lora(model):
    return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "query", "value"]))


def test_a_model_shows_the_wrapped_forward_and_adapter_names():
    model = lora(tiny_llama())
    params = inspect.signature(model.forward).parameters
    wrapped = inspect.signature(model.get_base_model().forward).parameters
    assert list(params) == [*[p for p in wrapped if p != "kwargs"], "adapter_names", "kwargs"]
    assert params["adapter_names"].kind is inspect.Parameter.KEYWORD_ONLY
    bert = inspect.signature(lora(tiny_bert_classifier()).forward).parameters
    assert "token_type_ids" in bert and "past_key_values" not in bert


def test_the_class_shows_labels_for_trainers():
    assert find_labels(PeftModel) == ["labels"] and not can_return_loss(PeftModel)
    assert list(inspect.signature(PeftModel.forward).parameters) == ["self", "args", "labels", "adapter_names",
                                                                     "kwargs"]


def test_calls_copies_and_overrides_behave_as_before():
    model = lora(tiny_llama()).eval()
    with torch.no_grad():
        out = model(input_ids=IDS, labels=IDS)
        torch.testing.assert_close(model.forward(IDS).logits, out.logits)
        assert out.loss is not None
        twin = copy.deepcopy(model)
        torch.testing.assert_close(twin(input_ids=IDS).logits, out.logits)
        assert inspect.signature(twin.forward).parameters.keys() == inspect.signature(model.forward).parameters.keys()
        model.forward = lambda *a, **k: "overridden"  # what accelerate does for mixed precision: still possible
        assert model(input_ids=IDS) == "overridden" and twin(input_ids=IDS).logits.shape == (1, 4, 272)
