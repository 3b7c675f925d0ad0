"""A short real run on the embedded SmolLM2-135M-Instruct: the trainer, the data pipeline with its chat
template, checkpoints and the evaluation, on the real model (marked slow: ~1 min on 2 cores)."""

import json
from importlib import resources

import pytest

from lorakit import PeftModel
from lorakit.models.loading import load_model_and_tokenizer
from lorakit.train.config import load_run_config
from lorakit.train.loop import run_training

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]


def test_lora_run_on_smollm2_learns_and_saves(tmp_path):
    demo = resources.files("lorakit") / "data" / "demo"
    cfg = load_run_config(None, base={
        "model": "smollm2", "output_dir": str(tmp_path / "run"),
        "adapter": {"method": "lora", "r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
        "data": {"path": str(demo / "train.jsonl"), "val_path": str(demo / "test.jsonl"), "cutoff_len": 128,
                 "max_samples": 48},
        "train": {"max_steps": 6, "batch_size": 8, "learning_rate": 2.0e-3, "warmup_steps": 2, "logging_steps": 1,
                  "save_steps": 3},
        "eval": {"max_samples": 4, "max_new_tokens": 24, "batch_size": 4},
    })
    result = run_training(cfg, show_progress=False)
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "run" / "metrics.jsonl") if '"loss"' in line]
    assert len(losses) == 6 and losses[-1] < 0.5 * losses[0], losses
    assert result.trainable_params == 2_442_240
    assert {"loss", "rougeL", "exact_match"} <= set(result.metrics)
    assert (tmp_path / "run" / "checkpoint-6" / "adapter_model.safetensors").exists()
    base, _ = load_model_and_tokenizer("smollm2")
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "run" / "adapter"))
    assert loaded.adapter_state_dict().keys() == result.model.adapter_state_dict().keys()
