"""`lorakit data` (and `lorakit train --dry-run`): how training will see the data, from the tokenizer alone."""

from __future__ import annotations

import pytest
import transformers

from tests.integration.cli_support import make_model_dir, run_cli, write_jsonl
from tests.train_fixtures import format_rows, save_tiny_classifier

RUN_YAML = """\
model: {model}
adapter: {{method: lora, r: 4, target_modules: all-linear}}
data: {{path: {data}, val_size: 2, cutoff_len: 40}}
train: {{batch_size: 2, gradient_accumulation_steps: 2}}
output_dir: {out}
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_data")
    model = make_model_dir(root / "model")
    rows = format_rows("alpaca", 10)
    rows[3]["output"] = ""
    rows[6]["output"] = "a long answer " * 4
    data = write_jsonl(root / "train.jsonl", rows)
    config = root / "run.yaml"
    config.write_text(RUN_YAML.format(model=model, data=data, out=root / "run"), encoding="utf-8")
    return root, model, data, config


@pytest.fixture
def no_weights(monkeypatch):
    """Loading any model's weights fails: the report must come from the tokenizer alone."""
    def refuse(*args, **kwargs):
        raise AssertionError("model weights were loaded")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", refuse)


def test_the_report_shows_rendering_masking_counts_and_warnings(workspace, capsys, no_weights):
    _, _, data, config = workspace
    code, out, err = run_cli(capsys, "data", config, "--show", "1")
    assert code == 0, err
    assert f"data: {data} (alpaca, detected): 8 training and 2 validation examples (val_size)" in out
    assert "cut at data.cutoff_len=40 (1 cut)" in out
    assert "template: the tokenizer's chat template; loss on the answers only (train_on_inputs: false)" in out
    assert "training rows: 8 (not packed); 2 steps per epoch at a global batch of 4 (batch_size 2 x " \
           "gradient_accumulation_steps 2, one process)" in out
    assert "example 1 of 8:" in out and "<|im_start|>user" in out
    assert "<|im_start|>assistant\n  ⟦0<|im_end|>" in out  # the answer, and only the answer, is trained
    assert "warnings: 2" in out
    assert "answers are empty (" in out and "train.jsonl: line 4)" in out
    assert "longer than data.cutoff_len=40 and cut there (" in out and "train.jsonl: line 7)" in out
    assert err == ""  # the warnings are in the report, not printed twice


def test_tokens_lists_each_token_with_its_mask(workspace, capsys, no_weights):
    _, _, _, config = workspace
    code, out, _ = run_cli(capsys, "data", config, "--show", "1", "--tokens", "data.train_on_inputs=true")
    assert code == 0
    assert "loss on every token" in out
    assert "position  id      trained  token" in out
    table = [line.split() for line in out.splitlines() if line.startswith("  ") and line.split()[0].isdigit()]
    assert table[0][2] == "-" and all(row[2] == "yes" for row in table[1:])  # only the very first is never trained


def test_without_a_run_config(workspace, capsys, no_weights):
    _, model, data, _ = workspace
    code, out, _ = run_cli(capsys, "data", "--data", data, "--model", model, "--show", "0", "--cutoff-len", "256")
    assert code == 0
    assert "10 training and 0 validation examples" in out and "example 1" not in out
    assert "(0 cut)" in out and "steps per epoch" not in out


def test_classification_data_shows_the_classes(tmp_path, capsys, no_weights):
    model = save_tiny_classifier(tmp_path / "bert")
    data = write_jsonl(tmp_path / "labels.jsonl", format_rows("text_label", 7))
    code, out, _ = run_cli(capsys, "data", "--data", data, "--model", model, "--show", "1")
    assert code == 0
    assert "classes (3; training examples): 0 = 'negative': 3, 1 = 'neutral': 2, 2 = 'positive': 2" in out
    assert "example 1 of 7: " in out and "class 0 ('negative')" in out


def test_train_dry_run_is_the_same_report_and_writes_nothing(workspace, capsys, no_weights):
    root, _, _, config = workspace
    code, dry, _ = run_cli(capsys, "train", config, "--dry-run")
    assert code == 0
    assert dry == run_cli(capsys, "data", config)[1]
    assert not (root / "run").exists()


def test_data_that_cannot_be_trained_on_is_an_error(workspace, capsys, no_weights):
    _, _, _, config = workspace
    code, _, err = run_cli(capsys, "data", config, "data.cutoff_len=8")
    assert code == 1 and "every label is masked" in err
