"""`lorakit demo` end to end on a tiny model (the real SmolLM2 run is `make demo`; see README)."""

import json
import os

import pytest
import yaml

from lorakit.cli.main import main
from tests.train_fixtures import one_torch_thread, save_tiny_llama  # noqa: F401

RESULT_SHAPE = {"method": None, "base": {"rougeL", "exact_match"}, "tuned": {"rougeL", "exact_match"},
                "trainable_params": None, "trainable_percent": None, "train_seconds": None, "peak_rss_mb": None}


def test_demo_writes_results_adapter_and_curve(tmp_path, capsys):
    model = save_tiny_llama(tmp_path / "model")
    out = tmp_path / "demo"
    assert main(["demo", "--model", model, "--output-dir", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) == set(RESULT_SHAPE)
    assert results["method"] == "LoRA"
    for side in ("base", "tuned"):
        assert set(results[side]) == RESULT_SHAPE[side]
        assert all(0.0 <= v <= 1.0 for v in results[side].values())
    assert results["trainable_params"] > 0 and 0 < results["trainable_percent"] < 100
    assert results["train_seconds"] > 0 and results["peak_rss_mb"] > 0
    for name in ("adapter/adapter_model.safetensors", "loss_curve.png", "metrics.jsonl", "run_config.yaml"):
        assert os.path.exists(out / name), name
    # the demo trains with lorakit train's default precision (bf16 where bf16 matmuls are fast)
    assert yaml.safe_load((out / "run_config.yaml").read_text())["train"]["bf16"] == "auto"
    printed = capsys.readouterr().out
    assert "ROUGE-L" in printed and "exact match" in printed and "request" in printed


def test_demo_refuses_an_existing_run(tmp_path, capsys):
    model = save_tiny_llama(tmp_path / "model")
    out = tmp_path / "demo"
    assert main(["demo", "--model", model, "--output-dir", str(out), "--no-progress"]) == 0
    before = (out / "results.json").read_bytes()
    assert main(["demo", "--model", model, "--output-dir", str(out), "--no-progress"]) == 1
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == before


@pytest.mark.parametrize("overrides, label, saved", [
    (["adapter.use_dora=true"], "LoRA (DoRA)", "adapter"),
    (["adapter.init_lora_weights=pissa", "train.lora_fa=true"], "LoRA (PiSSA, LoRA-FA)", "adapter"),
    (["finetuning_type=full", "train.learning_rate=1e-4"], "full fine-tuning", "model"),
])
def test_demo_runs_any_method_through_overrides(tmp_path, capsys, overrides, label, saved):
    model = save_tiny_llama(tmp_path / "model")
    out = tmp_path / "demo"
    assert main(["demo", "--model", model, "--output-dir", str(out), "--no-progress", *overrides]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == label
    assert os.path.isdir(out / saved)
    assert label in capsys.readouterr().out


def test_demo_override_errors_name_the_key(tmp_path, capsys):
    model = save_tiny_llama(tmp_path / "model")
    assert main(["demo", "--model", model, "--output-dir", str(tmp_path / "d"), "adapter.rr=4"]) == 1
    assert "unknown key 'rr'" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "d")
