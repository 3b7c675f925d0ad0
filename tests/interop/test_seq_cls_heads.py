"""PEFT writes a sequence-classification adapter's head into modules_to_save twice (the user's entry plus the
one it adds for SEQ_CLS: ["classifier", "classifier"] or ["classifier", "score", "classifier"]); such files load
in lorakit with the head trained once, and lorakit's files load in PEFT."""

from __future__ import annotations

import json

import peft
import torch

import lorakit
from tests.tiny import tiny_bert_classifier


def _inputs():
    ids = torch.randint(5, 200, (2, 7), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_peft_seq_cls_adapter_with_its_head_listed_twice_loads(tmp_path):
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"],
                             task_type="SEQ_CLS", init_lora_weights=False)
    model = peft.get_peft_model(tiny_bert_classifier(), config)
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].weight.normal_()
    model.eval()
    model.save_pretrained(tmp_path)
    listed = json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"]
    assert listed.count("classifier") >= 1
    loaded = lorakit.PeftModel.from_pretrained(tiny_bert_classifier(), str(tmp_path))
    assert loaded.peft_config["default"].modules_to_save.count("classifier") == 1
    torch.testing.assert_close(loaded(**_inputs()).logits, model(**_inputs()).logits, atol=1e-5, rtol=1e-5)


def test_lorakit_seq_cls_adapter_loads_in_peft(tmp_path):
    torch.manual_seed(0)
    config = lorakit.LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"],
                                task_type="SEQ_CLS", init_lora_weights=False)
    model = lorakit.get_peft_model(tiny_bert_classifier(), config)
    with torch.no_grad():
        model.get_base_model().classifier.modules_to_save["default"].weight.normal_()
    model.eval()
    model.save_pretrained(str(tmp_path))
    loaded = peft.PeftModel.from_pretrained(tiny_bert_classifier(), str(tmp_path))
    loaded.eval()
    torch.testing.assert_close(loaded(**_inputs()).logits, model(**_inputs()).logits, atol=1e-5, rtol=1e-5)
