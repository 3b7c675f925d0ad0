"""What a finished run leaves behind: the adapter (saved before the final evaluation, so a failing evaluation
never costs the trained weights), a run_config.yaml that reproduces the run, metrics, a loss curve."""

import json

import pytest

from lorakit.train import loop
from lorakit.train.config import load_run_config
from lorakit.train.loop import run_training
from tests.train_fixtures import metrics_records, tiny_run_config


def test_a_failing_final_evaluation_still_leaves_the_trained_adapter(tmp_path, monkeypatch):
    real_evaluate = loop.evaluate_model

    def evaluate(*args, with_generation=False, **kwargs):
        if with_generation:
            raise RuntimeError("generation broke")
        return real_evaluate(*args, with_generation=with_generation, **kwargs)

    monkeypatch.setattr(loop, "evaluate_model", evaluate)
    with pytest.raises(RuntimeError, match="generation broke"):
        run_training(tiny_run_config(tmp_path, "train.max_steps=2", "data.val_size=4"), show_progress=False)
    adapter = tmp_path / "run" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "tokenizer_config.json").is_file()


def test_a_finished_run_leaves_results_metrics_and_a_reproducing_config(tmp_path):
    cfg = tiny_run_config(tmp_path, "train.max_steps=4", "train.eval_steps=2", "data.val_size=4",
                          "eval.generate=true")
    result = run_training(cfg, show_progress=False)
    out = tmp_path / "run"
    assert load_run_config(str(out / "run_config.yaml")) == cfg
    records = metrics_records(out)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "eval_loss" in r] == [2, 4, 4]  # every 2 steps, and the final one
    assert "eval_rouge1" in records[-1]
    summary = json.loads((out / "train_results.json").read_text())
    assert summary["steps"] == 4 and summary["eval"] == pytest.approx(result.metrics)
    assert summary["saved_to"] == str(out / "adapter") and summary["peak_rss_mb"] > 0
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
