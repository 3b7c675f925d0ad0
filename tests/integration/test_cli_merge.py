"""`lorakit merge`: a plain transformers model that computes what base + adapter computes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from lorakit import LoraConfig, PeftModel, get_peft_model, quantize_model
from tests.integration.cli_support import make_adapter, make_model_dir, run_cli
from tests.tiny import tiny_bert_classifier, tiny_tokenizer

TOKENS = torch.tensor([[1, 20, 45, 90, 7, 33, 100, 4]])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_merge")
    model_dir = make_model_dir(root / "model")
    return model_dir, make_adapter(model_dir, root / "adapter")


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(input_ids=TOKENS).logits


def test_merged_model_loads_with_transformers_and_matches(setup, capsys, tmp_path):
    model_dir, adapter = setup
    out = tmp_path / "merged"
    code, stdout, stderr = run_cli(capsys, "merge", "--model", model_dir, "--adapter", adapter, "--output", out)
    assert code == 0, stderr
    assert f"-> {out}" in stdout and "float32" in stdout
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(adapter)).eval()
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert torch.allclose(logits(merged), logits(with_adapter), atol=1e-5)
    assert not torch.allclose(logits(merged), logits(base), atol=1e-3)  # the adapter did change the model
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("hi")["input_ids"] == AutoTokenizer.from_pretrained(model_dir)("hi")["input_ids"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temporary directory left behind


def test_merge_into_the_dequantized_nf4_base(setup, capsys, tmp_path):
    """--quantization nf4: the adapter is merged into the NF4 weights it was trained against (dequantized), not
    into the original ones; the result is a dense model all the same."""
    model_dir, adapter = setup
    out = tmp_path / "merged"
    code, _, stderr = run_cli(capsys, "merge", "--model", model_dir, "--adapter", adapter, "--output", out,
                              "--quantization", "nf4")
    assert code == 0, stderr
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    nf4_base = quantize_model(AutoModelForCausalLM.from_pretrained(model_dir), compute_dtype="float32")
    on_nf4 = PeftModel.from_pretrained(nf4_base, str(adapter)).eval()
    on_dense = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(adapter)).eval()
    assert torch.allclose(logits(merged), logits(on_nf4), atol=1e-5)
    assert not torch.allclose(logits(merged), logits(on_dense), atol=1e-3)


def test_classifier_adapter_on_a_headless_encoder(capsys, tmp_path):
    """A SEQ_CLS adapter trained on a bare encoder (like the embedded MiniLM): the head size comes from the
    adapter's saved head, and the merged model loads with AutoModelForSequenceClassification."""
    encoder_dir = tmp_path / "encoder"
    tiny_bert_classifier().bert.save_pretrained(encoder_dir)  # a BertModel: no classification head
    tiny_tokenizer(chat_template=False).save_pretrained(encoder_dir)

    def classifier():
        return AutoModelForSequenceClassification.from_pretrained(encoder_dir, num_labels=3).eval()

    torch.manual_seed(0)
    config = LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS", init_lora_weights=False)
    peft_model = get_peft_model(classifier(), config)
    with torch.no_grad():
        peft_model.base_model.model.classifier.modules_to_save["default"].weight.normal_()
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    out = tmp_path / "merged"
    code, _, stderr = run_cli(capsys, "merge", "--model", encoder_dir, "--adapter", tmp_path / "adapter",
                              "--output", out)
    assert code == 0, stderr
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    reference = PeftModel.from_pretrained(classifier(), str(tmp_path / "adapter")).eval()
    assert merged.config.num_labels == 3
    assert torch.allclose(logits(merged), logits(reference), atol=1e-5)


def test_existing_output_is_refused_unless_overwrite(setup, capsys, tmp_path):
    model_dir, adapter = setup
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine", encoding="utf-8")
    code, _, stderr = run_cli(capsys, "merge", "--adapter", adapter, "--output", out)
    assert code == 1
    assert stderr.startswith("lorakit: error: --output") and "--overwrite" in stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # untouched
    code, _, stderr = run_cli(capsys, "merge", "--adapter", adapter, "--output", out, "--overwrite")
    assert code == 0, stderr
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_merge_bad_inputs(setup, capsys, tmp_path):
    model_dir, adapter = setup
    cases = [
        (["--model", model_dir, "--adapter", tmp_path / "nowhere", "--output", tmp_path / "a"], "does not exist"),
        (["--model", model_dir, "--adapter", model_dir, "--output", tmp_path / "b"], "not an adapter directory"),
        (["--adapter", adapter, "--output", tmp_path / "no" / "parent"], "parent directory"),
    ]
    for args, expected in cases:
        code, _, stderr = run_cli(capsys, "merge", *args)
        assert code == 1, args
        assert stderr.startswith("lorakit: error: ") and expected in stderr, stderr
    assert run_cli(capsys, "merge", "--model", model_dir, "--output", tmp_path / "c")[0] == 2  # --adapter required
