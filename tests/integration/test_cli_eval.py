"""`lorakit eval`: base and adapter side by side from one load, for generation data and classification."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit import LoraConfig, get_peft_model
from lorakit.eval import generate_batch
from lorakit.train.data import DataConfig, generation_prompts, load_splits
from tests.integration.cli_support import ALPACA_ROWS, make_adapter, make_model_dir, run_cli, write_jsonl
from tests.tiny import tiny_bert_classifier, tiny_tokenizer

MAX_NEW_TOKENS = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A model, an adapter on it, and data whose answers are exactly the base model's greedy answers."""
    root = tmp_path_factory.mktemp("cli_eval")
    model_dir = make_model_dir(root / "model")
    adapter = make_adapter(model_dir, root / "adapter")
    rows = ALPACA_ROWS[:6]
    draft = write_jsonl(root / "draft.jsonl", rows)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = generation_prompts(load_splits(DataConfig(path=str(draft))).train, tokenizer)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    answers = generate_batch(base, tokenizer, [p.prompt_ids for p in prompts], max_new_tokens=MAX_NEW_TOKENS)
    data = write_jsonl(root / "data.jsonl", [{**row, "output": a} for row, a in zip(rows, answers)])
    return root, model_dir, adapter, data


def test_eval_table_base_and_adapter(setup, capsys):
    root, _, adapter, data = setup
    out = root / "results.json"
    # no --model: the base model named in the adapter's adapter_config.json
    code, stdout, stderr = run_cli(capsys, "eval", "--adapter", adapter, "--data", data,
                                   "--max-new-tokens", MAX_NEW_TOKENS, "--output", out)
    assert code == 0, stderr
    header, rule, *rows = stdout.splitlines()[1:]
    assert header.split() == ["metric", "base", "adapter", "change"]
    labels = [row.rsplit(None, 3)[0] for row in rows if row.strip() and not row.startswith("results")]
    assert labels == ["ROUGE-1", "ROUGE-2", "ROUGE-L", "ROUGE-Lsum", "exact match", "loss", "perplexity"]
    results = json.loads(out.read_text())
    base, tuned = results["metrics"]["base"], results["metrics"]["adapter"]
    assert base["exact_match"] == 1.0  # the references are the base model's own greedy answers
    assert tuned["loss"] != pytest.approx(base["loss"])  # the adapter changes the model
    assert len(results["samples"]) == 6 and set(results["samples"][0]) == {"index", "reference", "base", "adapter"}
    assert [s["base"] for s in results["samples"]] == [s["reference"] for s in results["samples"]]


def test_base_numbers_equal_a_run_without_adapter(setup, capsys, tmp_path):
    """The base column (adapter switched off) is the base model itself."""
    _, model_dir, adapter, data = setup
    both, alone = tmp_path / "both.json", tmp_path / "alone.json"
    common = ["--data", data, "--max-new-tokens", MAX_NEW_TOKENS, "--max-samples", 3]
    assert run_cli(capsys, "eval", "--model", model_dir, "--adapter", adapter, *common, "--output", both)[0] == 0
    code, stdout, _ = run_cli(capsys, "eval", "--model", model_dir, *common, "--output", alone)
    assert code == 0
    assert stdout.splitlines()[1].split() == ["metric", "base"]
    with_adapter, without = json.loads(both.read_text()), json.loads(alone.read_text())
    assert with_adapter["metrics"]["base"] == pytest.approx(without["metrics"]["base"])
    assert with_adapter["num_examples"] == without["num_examples"] == 3


def test_eval_classification_accuracy(capsys, tmp_path):
    model_dir = tmp_path / "bert"
    tiny_bert_classifier(num_labels=2).save_pretrained(model_dir)
    tiny_tokenizer(chat_template=False).save_pretrained(model_dir)
    torch.manual_seed(0)
    config = LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS", init_lora_weights=False)
    peft_model = get_peft_model(tiny_bert_classifier(num_labels=2), config)
    with torch.no_grad():  # a trained-looking head, different from the base head
        peft_model.base_model.model.classifier.modules_to_save["default"].weight.normal_()
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    data = write_jsonl(tmp_path / "reviews.jsonl", [{"text": f"review {i}", "label": ["neg", "pos"][i % 2]}
                                                    for i in range(8)])
    out = tmp_path / "results.json"
    code, stdout, stderr = run_cli(capsys, "eval", "--model", model_dir, "--adapter", tmp_path / "adapter",
                                   "--data", data, "--output", out)
    assert code == 0, stderr
    assert "accuracy" in stdout and "ROUGE" not in stdout
    metrics = json.loads(out.read_text())["metrics"]
    for name in ("base", "adapter"):
        assert 0.0 <= metrics[name]["accuracy"] <= 1.0 and metrics[name]["loss"] > 0
    assert metrics["adapter"]["loss"] != pytest.approx(metrics["base"]["loss"])


def test_eval_bad_inputs(setup, capsys, tmp_path):
    _, model_dir, adapter, data = setup
    labelled = write_jsonl(tmp_path / "labelled.jsonl", [{"text": "fine", "label": 1}, {"text": "bad", "label": 0}])
    cases = [
        (["--adapter", adapter, "--data", labelled], "is for CAUSAL_LM, but 'text_label' data"),
        (["--model", model_dir, "--adapter", model_dir, "--data", data], "not an adapter directory"),
        (["--model", model_dir, "--adapter", tmp_path / "nowhere", "--data", data], "does not exist"),
        (["--model", tmp_path / "no-model", "--data", data], "does not exist"),
        (["--model", model_dir, "--data", tmp_path / "missing.jsonl"], "not found"),
        (["--model", model_dir, "--data", data, "--max-samples", 0], "--max-samples must be a positive"),
        (["--data", data], "--model is required"),
    ]
    for args, expected in cases:
        code, _, stderr = run_cli(capsys, "eval", *args)
        assert code == 1, args
        assert stderr.startswith("lorakit: error: ") and expected in stderr, stderr
        assert len(stderr.strip().splitlines()) == 1
