"""Every data format and file type end to end through run_training, packing, and classification with accuracy."""

import json

import pytest
import torch

from lorakit.train.data import build_datasets, make_collator
from lorakit.train.loop import run_training
from tests.train_fixtures import format_rows, save_tiny_classifier, tiny_run_config, write_rows
from tests.train_fixtures import one_torch_thread  # noqa: F401  (an autouse fixture)

# each format once, each file type at least once ("" = a datasets.save_to_disk folder)
CASES = {
    "alpaca": ("alpaca", "train.json"),
    "messages": ("messages", "train.jsonl"),
    "sharegpt": ("sharegpt", "train_saved"),
    "prompt_completion": ("prompt_completion", "train.parquet"),
    "text": ("text", "train.csv"),
}


@pytest.mark.parametrize("fmt, file_name", CASES.values(), ids=CASES.keys())
def test_each_format_and_file_type_trains_and_evaluates(tmp_path, fmt, file_name):
    data = write_rows(tmp_path / file_name, format_rows(fmt, 16))
    cfg = tiny_run_config(tmp_path, "train.max_steps=2", "data.val_size=4", "eval.generate=true", data=data)
    result = run_training(cfg, show_progress=False)

    assert result.steps == 2 and result.train_loss is not None and 0 < result.train_loss < 20
    summary = json.loads((tmp_path / "run" / "train_results.json").read_text())
    assert summary["steps"] == 2 and 0 < summary["eval"]["loss"] < 20
    if fmt == "text":  # no prompt/answer pairs: loss and perplexity only
        assert set(summary["eval"]) == {"loss", "perplexity"}
    else:
        assert summary["eval"]["generated"] == 2 and 0 <= summary["eval"]["rougeL"] <= 1
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_packing_trains_on_fewer_longer_rows(tmp_path):
    data = write_rows(tmp_path / "train.jsonl", format_rows("alpaca", 24))
    cfg = tiny_run_config(tmp_path, "data.packing=true", "data.cutoff_len=128", "train.max_steps=2",
                          "train.batch_size=2", data=data)
    from transformers import AutoTokenizer

    rows, _, info = build_datasets(cfg.data, AutoTokenizer.from_pretrained(tmp_path / "model"))
    assert info.num_train == 24 and info.num_train_rows < 24 // 2  # several examples per row
    assert all("position_ids" in row for row in rows)
    result = run_training(cfg, show_progress=False)
    assert result.steps == 2 and 0 < result.train_loss < 20


def test_text_label_classification_reports_accuracy(tmp_path):
    model = save_tiny_classifier(tmp_path / "bert")
    data = write_rows(tmp_path / "labels.jsonl", format_rows("text_label", 24))
    cfg = tiny_run_config(tmp_path, "task_type=SEQ_CLS", "data.val_size=6", "train.max_steps=3",
                          "adapter.target_modules=[query, value]", model=model, data=data)
    result = run_training(cfg, show_progress=False)

    summary = json.loads((tmp_path / "run" / "train_results.json").read_text())
    accuracy = summary["eval"]["accuracy"]
    assert result.metrics["accuracy"] == accuracy and "rouge1" not in summary["eval"]
    # the reported accuracy is that of the trained model on the 6 validation texts
    _, val_rows, info = build_datasets(cfg.data, result.tokenizer, "SEQ_CLS")
    assert info.label_names == ("negative", "neutral", "positive") and len(val_rows) == 6
    batch = make_collator(cfg.data, result.tokenizer)(val_rows)
    result.model.eval()
    with torch.no_grad():
        logits = result.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert accuracy == pytest.approx(float((logits.argmax(-1) == batch["labels"]).float().mean()))
    # the new 3-class head is trained in full next to the adapter
    trained = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert any("classifier" in n for n in trained) and any("lora_A" in n for n in trained)
    assert result.model.get_base_model().config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
