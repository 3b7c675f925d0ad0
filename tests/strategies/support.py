"""Shared pieces of the trainer-strategy tests: a spy hook that watches the real training loop, runs that
stop and resume, and reading a run's saved whole model.

    spy = Spy(record=lambda event, step, model, optimizer: ...)
    result, hooks = spy_run(tmp_path, monkeypatch, spy, "train.relora_steps=3")

The spy is the last hook of the run, so in each phase it sees what the strategy hooks did before it.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file

from lorakit.train import loop, setup
from lorakit.train.hooks import run_hooks
from lorakit.train.loop import run_training
from lorakit.training_hooks import TrainingHook
from tests.reliability.test_resume import StopAtStep
from tests.train_fixtures import save_tiny_llama, tiny_run_config, train_losses

# Settings under which the tiny random model learns the toy task within 30 steps: its frozen head has too small
# logits to fit anything, so the adapter also targets lm_head; a constant learning rate.
LEARNS = ("adapter.target_modules=[q_proj, v_proj, up_proj, down_proj, lm_head]", "train.lr_scheduler=constant")


class Spy(TrainingHook):
    """Calls `record(event, step, model, optimizer)` at before_step / after_step / step_end."""

    name = "spy"

    def __init__(self, record) -> None:
        self.record, self.model, self.optimizer = record, None, None

    def setup(self, model) -> None:
        self.model = model

    def on_train_start(self, step, optimizer) -> None:
        self.optimizer = optimizer
        self.record("train_start", step, self.model, optimizer)

    def before_optimizer_step(self, step) -> None:
        self.record("before_step", step, self.model, self.optimizer)

    def after_optimizer_step(self, step) -> None:
        self.record("after_step", step, self.model, self.optimizer)

    def on_step_end(self, step, optimizer) -> None:
        self.record("step_end", step, self.model, optimizer)


def spy_run(tmp_path, monkeypatch, spy: Spy | None, *overrides: str, model=None, output: str = "run"):
    """(TrainResult, the run's hooks) of a tiny run with `spy` appended to its hooks."""
    captured = {}

    def hooks_with_spy(model_, cfg, run):
        hooks = run_hooks(model_, cfg, run)
        captured["hooks"] = hooks
        return hooks + ([spy] if spy else [])

    cfg = tiny_run_config(tmp_path, *overrides, model=model, output=output)
    with monkeypatch.context() as patch:
        patch.setattr(setup, "run_hooks", hooks_with_spy)  # prepare_training_model's
        result = run_training(cfg, show_progress=False)
    return result, captured["hooks"]


def straight_and_resumed(tmp_path, monkeypatch, stop_step: int, *overrides: str, model=None):
    """(uninterrupted result, resumed result): the second run is stopped after `stop_step` (as by Ctrl-C) and
    resumed from its checkpoint; both in tmp_path (outputs "straight" and "interrupted")."""
    straight = run_training(tiny_run_config(tmp_path, *overrides, model=model, output="straight"),
                            show_progress=False)
    with monkeypatch.context() as patch:
        patch.setattr(loop, "_StopOnCtrlC", lambda: StopAtStep(stop_step))
        first = run_training(tiny_run_config(tmp_path, *overrides, model=model, output="interrupted"),
                             show_progress=False)
    assert first.interrupted and first.steps == stop_step
    resumed = run_training(tiny_run_config(tmp_path, *overrides, "train.resume_from_checkpoint=latest", model=model,
                                           output="interrupted"), show_progress=False)
    assert resumed.steps == straight.steps and not resumed.interrupted
    assert train_losses(tmp_path / "interrupted") == train_losses(tmp_path / "straight")
    return straight, resumed


def saved_model(run_dir) -> dict[str, torch.Tensor]:
    """The whole model a run saved in run_dir/model."""
    path = os.path.join(run_dir, "model", "model.safetensors")
    return load_file(path)


def four_block_llama(tmp_path) -> str:
    """A tiny Llama with 4 transformer blocks (the default tiny model has 2)."""
    path = tmp_path / "model4"
    if not (path / "config.json").is_file():
        save_tiny_llama(path, num_hidden_layers=4)
    return str(path)


def first_loss_and_last(run_dir) -> tuple[float, float]:
    losses = train_losses(run_dir)
    return losses[min(losses)], losses[max(losses)]
