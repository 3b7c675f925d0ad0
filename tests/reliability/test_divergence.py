"""A non-finite loss or gradient stops the run with a RunError that names the step, the last good checkpoint
and what to do; the bad step is not applied and the checkpoints stay intact."""

import math
import os

import pytest

from lorakit.train import checkpoint as ckpt
from lorakit.train import loop, setup
from lorakit.train.loop import run_training
from lorakit.train.setup import RunError
from tests.train_fixtures import assert_same_tensors, checkpoint_weights, tiny_run_config, trained_weights


def test_nan_loss_at_step_k_stops_before_updating_the_weights(tmp_path, monkeypatch):
    real_loss, calls, models = loop.summed_token_loss, [], []

    def loss_nan_at_step_5(model, batch, config=None):
        calls.append(1)
        loss, tokens = real_loss(model, batch, config=config)
        return (loss * math.nan if len(calls) == 5 else loss), tokens

    real_prepare = setup.prepare_model
    monkeypatch.setattr(loop, "summed_token_loss", loss_nan_at_step_5)
    monkeypatch.setattr(setup, "prepare_model", lambda *a: models.append(real_prepare(*a)) or models[-1])
    with pytest.raises(RunError) as err:
        run_training(tiny_run_config(tmp_path, "train.max_steps=8", "train.save_steps=2"), show_progress=False)

    out = tmp_path / "run"
    message = str(err.value)
    assert "diverged at step 5" in message and "loss=nan" in message
    assert str(out / "checkpoint-4") in message
    assert "train.learning_rate" in message and "The step was not applied" in message
    # the weights in memory are those of step 4: the NaN step changed nothing
    assert_same_tensors(trained_weights(models[0]), checkpoint_weights(out / "checkpoint-4"))
    assert ckpt.list_checkpoints(str(out)) == [str(out / "checkpoint-2"), str(out / "checkpoint-4")]
    assert ckpt.read_trainer_state(out / "checkpoint-4")["position"]["step"] == 4
    assert not (out / "checkpoint-5").exists() and not (out / "train_results.json").exists()
    assert not [name for name in os.listdir(out) if ".tmp" in name]


def test_a_huge_learning_rate_diverges_with_advice_and_no_checkpoint_to_name(tmp_path):
    cfg = tiny_run_config(tmp_path, "train.learning_rate=1e30", "train.max_steps=6", "train.max_grad_norm=0")
    with pytest.raises(RunError, match=r"training diverged at step \d") as err:
        run_training(cfg, show_progress=False)
    assert "1e+30" in str(err.value)
    assert "none (set train.save_steps to keep checkpoints)" in str(err.value)
