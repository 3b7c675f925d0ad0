"""Sequence classification on the embedded MiniLM encoder: LoRA + a fresh classifier head trained in full
(modules_to_save), text_label data, scored by accuracy (marked slow: real 22M-parameter model)."""

import json
import random

import pytest

from lorakit.train.config import load_run_config
from lorakit.train.loop import run_training

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]

GOOD = ["a wonderful film", "great acting and a moving story", "I loved every minute", "brilliant and funny",
        "a delightful surprise", "superb, heartfelt work"]
BAD = ["a dull mess", "boring and far too long", "I hated every minute", "clumsy and tedious",
       "a complete waste of time", "awful, lifeless work"]


def write_rows(path, n, seed):
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            label = rng.choice(["positive", "negative"])
            text = f"{rng.choice(GOOD if label == 'positive' else BAD)}, said the {rng.choice(['critic', 'viewer'])}"
            fh.write(json.dumps({"text": text, "label": label}) + "\n")


def test_minilm_lora_classifier_learns(tmp_path):
    write_rows(tmp_path / "train.jsonl", 96, 0)
    write_rows(tmp_path / "val.jsonl", 32, 1)
    cfg = load_run_config(None, base={
        "model": "minilm", "task_type": "SEQ_CLS", "output_dir": str(tmp_path / "run"),
        "adapter": {"method": "lora", "r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]},
        "data": {"path": str(tmp_path / "train.jsonl"), "val_path": str(tmp_path / "val.jsonl"), "cutoff_len": 32},
        "train": {"num_epochs": 3, "batch_size": 16, "learning_rate": 2.0e-3, "logging_steps": 1},
    })
    result = run_training(cfg, show_progress=False)
    assert result.metrics["accuracy"] >= 0.9, result.metrics
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_CLS" and "classifier" in saved["modules_to_save"]
