"""Classification adapters save their class names (labels.json); evaluation maps the data's labels to the head's
outputs by name, so a test set with one class, or with classes that sort differently, is scored correctly."""

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lorakit import PeftModel
from lorakit.cli.main import main
from lorakit.train.loop import run_training
from tests.train_fixtures import LABELS, format_rows, save_tiny_classifier, tiny_run_config, write_rows


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("labels")
    model = save_tiny_classifier(root / "bert")
    data = write_rows(root / "labels.jsonl", format_rows("text_label", 24))
    run_training(tiny_run_config(root, "task_type=SEQ_CLS", "adapter.target_modules=[query, value]",
                                 "train.max_steps=6", "train.save_steps=3", "adapter.init_lora_weights=false",
                                 model=model, data=data), show_progress=False)
    return root, model


def test_the_adapter_and_each_checkpoint_record_the_class_names(trained):
    root, _ = trained
    for directory in ("adapter", "checkpoint-3", "checkpoint-6"):
        assert json.loads((root / "run" / directory / "labels.json").read_text()) == {"label_names": list(LABELS)}


def predicted_ids(root, model, texts) -> list[int]:
    base = AutoModelForSequenceClassification.from_pretrained(model, num_labels=len(LABELS))
    peft_model = PeftModel.from_pretrained(base, str(root / "run" / "adapter")).eval()
    tokenizer = AutoTokenizer.from_pretrained(model)
    with torch.no_grad():
        return [int(peft_model(**tokenizer(text, return_tensors="pt")).logits.argmax(-1)) for text in texts]


@pytest.mark.parametrize("labels", [("positive",), ("neutral", "positive"), ("positive", "negative")],
                         ids=["a single class", "classes that sort differently", "two of three"])
def test_eval_maps_labels_by_name(trained, tmp_path, capsys, labels):
    root, model = trained
    rows = [{"text": f"item {i} is {labels[i % len(labels)]}", "label": labels[i % len(labels)]} for i in range(6)]
    data = write_rows(tmp_path / "test.jsonl", rows)
    out = tmp_path / "results.json"
    code = main(["eval", "--adapter", str(root / "run"), "--data", str(data), "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    predictions = predicted_ids(root, model, [r["text"] for r in rows])
    expected = sum(p == LABELS.index(r["label"]) for p, r in zip(predictions, rows)) / len(rows)
    assert json.loads(out.read_text())["metrics"]["adapter"]["accuracy"] == pytest.approx(expected)


def test_a_merged_classifier_keeps_the_class_names(trained, tmp_path):
    root, model = trained
    assert main(["merge", "--adapter", str(root / "run"), "--output", str(tmp_path / "merged")]) == 0
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert [config["id2label"][str(i)] for i in range(3)] == list(LABELS)


def test_peft_still_loads_an_adapter_directory_with_labels_json(trained):
    peft = pytest.importorskip("peft")
    root, model = trained
    base = AutoModelForSequenceClassification.from_pretrained(model, num_labels=len(LABELS))
    assert peft.PeftModel.from_pretrained(base, str(root / "run" / "adapter")) is not None
