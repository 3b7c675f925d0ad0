"""What one optimizer step computes: gradient accumulation, seeds, bf16 autocast, gradient checkpointing, and
one scheduler step per optimizer step."""

import math

import pytest
import torch

from lorakit.train.loop import run_training
from lorakit.train.optim import lr_factor
from tests.train_fixtures import (
    assert_same_tensors, metrics_records, tiny_run_config, train_losses, trained_weights, write_rows,
)
from tests.train_fixtures import one_torch_thread  # noqa: F401  (an autouse fixture)


def train(tmp_path, output: str, *overrides: str, data=None):
    return run_training(tiny_run_config(tmp_path, *overrides, output=output, data=data), show_progress=False)


def varied_lengths(tmp_path) -> str:
    """20 records whose answers run from 1 to 40 characters: micro-batches hold very different token counts."""
    rows = [{"instruction": f"repeat {i}", "output": "ab" * (1 + (7 * i) % 20)} for i in range(20)]
    return write_rows(tmp_path / "varied.json", rows)


@pytest.mark.parametrize("batch, accumulation", [(4, 2), (2, 4)])
def test_gradient_accumulation_equals_one_big_batch(tmp_path, batch, accumulation):
    """The loss of a step is the mean over every trained token of the global batch (not a mean of micro-batch
    means), so splitting a batch of 8 changes nothing. 20 records: the third batch holds only 4."""
    data = varied_lengths(tmp_path)
    big = train(tmp_path, "big", "train.batch_size=8", "train.max_steps=3", data=data)
    split = train(tmp_path, "split", f"train.batch_size={batch}", f"train.gradient_accumulation_steps={accumulation}",
                  "train.max_steps=3", data=data)
    assert_same_tensors(trained_weights(split.model), trained_weights(big.model), atol=1e-6)
    assert train_losses(tmp_path / "split") == pytest.approx(train_losses(tmp_path / "big"), abs=1e-6)


def test_the_same_seed_repeats_a_run_bit_for_bit_and_another_seed_does_not(tmp_path):
    dropout = "adapter.lora_dropout=0.2"
    first = train(tmp_path, "a", dropout, "train.seed=7")
    again = train(tmp_path, "b", dropout, "train.seed=7")
    other = train(tmp_path, "c", dropout, "train.seed=8")
    assert_same_tensors(trained_weights(again.model), trained_weights(first.model))
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b")
    a, c = trained_weights(first.model), trained_weights(other.model)
    assert all(not torch.equal(a[name], c[name]) for name in a if ".lora_A." in name)  # another initialisation


def test_bf16_runs_on_cpu_with_a_finite_loss_fp32_trained_weights_and_bf16_frozen_ones(tmp_path):
    result = train(tmp_path, "bf16", "train.bf16=true", "train.max_steps=2", "data.val_size=4")
    train(tmp_path, "fp32", "train.max_steps=2", "data.val_size=4")
    losses = train_losses(tmp_path / "bf16")
    assert all(math.isfinite(v) for v in losses.values()) and math.isfinite(result.metrics["loss"])
    # fp32 master weights for what trains; the frozen base weights are stored in bf16 (train/precision.py)
    assert all(p.dtype == torch.float32 for p in result.model.parameters() if p.requires_grad)
    assert all(p.dtype == torch.bfloat16 for p in result.model.parameters() if not p.requires_grad)
    # bf16 really computed something different from fp32, but close to it
    assert losses != train_losses(tmp_path / "fp32")
    assert losses[1] == pytest.approx(train_losses(tmp_path / "fp32")[1], rel=2e-2)


def checkpointing_enabled(model) -> bool:
    base = model.get_base_model()
    # transformers 5.x renamed the property (the old name warns); support both
    name = "is_activation_checkpointing" if hasattr(type(base), "is_activation_checkpointing") \
        else "is_gradient_checkpointing"
    return bool(getattr(base, name))


def test_gradient_checkpointing_gives_the_same_losses_and_weights(tmp_path):
    plain = train(tmp_path, "plain", "train.max_steps=3")
    checkpointed = train(tmp_path, "ckpt", "train.max_steps=3", "train.gradient_checkpointing=true")
    assert checkpointing_enabled(checkpointed.model) and not checkpointing_enabled(plain.model)
    assert train_losses(tmp_path / "ckpt") == pytest.approx(train_losses(tmp_path / "plain"), abs=1e-5)
    assert_same_tensors(trained_weights(checkpointed.model), trained_weights(plain.model), atol=1e-5)


def test_one_scheduler_step_per_optimizer_step_with_accumulation(tmp_path):
    train(tmp_path, "run", "train.batch_size=2", "train.gradient_accumulation_steps=2", "train.max_steps=6",
          "train.warmup_steps=2", "train.lr_scheduler=linear", "train.learning_rate=1e-3")
    logged = {r["step"]: r["lr"] for r in metrics_records(tmp_path / "run") if "lr" in r}
    # the logged lr is the scheduler's value after step s, i.e. the factor at index s
    assert logged == {s: pytest.approx(1e-3 * lr_factor(s, 2, 6, "linear")) for s in range(1, 7)}
    assert logged[6] == 0.0
