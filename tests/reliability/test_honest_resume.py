"""Resume is honest: a setting changed on resume either takes effect (with a warning naming it) or is refused
by name (test_bad_input.py, test_catalogue.py); never recorded in run_config.yaml and ignored. The loss window,
the last loss and the training time continue across a resume."""

import json

import pytest
import yaml

from lorakit.train import loop
from lorakit.train.checkpoint import read_trainer_state
from lorakit.train.loop import run_training
from lorakit.train.optim import lr_factor
from tests.reliability.test_resume import StopAtStep
from tests.train_fixtures import metrics_records, tiny_run_config, train_losses

SCHEDULE = ("train.max_steps=8", "train.save_steps=2", "train.warmup_steps=2", "train.lr_scheduler=cosine")


def stopped_at(tmp_path, monkeypatch, step: int, *overrides: str):
    with monkeypatch.context() as patch:
        patch.setattr(loop, "_StopOnCtrlC", lambda: StopAtStep(step))
        return run_training(tiny_run_config(tmp_path, *SCHEDULE, *overrides), show_progress=False)


def logged_lr(out) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in metrics_records(out) if "lr" in r}


def test_a_changed_learning_rate_takes_effect_with_a_warning(tmp_path, monkeypatch, caplog):
    stopped_at(tmp_path, monkeypatch, 4)
    resumed = run_training(tiny_run_config(tmp_path, *SCHEDULE, "train.learning_rate=1e-3",
                                           "train.resume_from_checkpoint=latest"), show_progress=False)
    assert resumed.steps == 8
    assert "resuming with changed settings, in effect from step 5: train.learning_rate 0.01 -> 0.001" in caplog.text
    lrs = logged_lr(tmp_path / "run")
    for step in range(5, 9):  # the lr logged after step k is the one of step k + 1 (0-based index k)
        assert lrs[step] == pytest.approx(1e-3 * lr_factor(step, 2, 8, "cosine")), step
    assert lrs[4] == pytest.approx(1e-2 * lr_factor(4, 2, 8, "cosine"))  # before the resume: the old one
    recorded = yaml.safe_load((tmp_path / "run" / "run_config.yaml").read_text())
    assert recorded["train"]["learning_rate"] == 1e-3  # recorded, and true


def test_more_steps_on_a_finished_run_stretch_the_schedule(tmp_path, caplog):
    run_training(tiny_run_config(tmp_path, *SCHEDULE), show_progress=False)
    resumed = run_training(tiny_run_config(tmp_path, *SCHEDULE, "train.max_steps=12",
                                           "train.resume_from_checkpoint=latest"), show_progress=False)
    assert resumed.steps == 12 and "train.max_steps 8 -> 12" in caplog.text
    lrs = logged_lr(tmp_path / "run")
    assert lrs[9] == pytest.approx(1e-2 * lr_factor(9, 2, 12, "cosine"))
    assert sorted(train_losses(tmp_path / "run")) == list(range(1, 13))


def test_changed_adam_settings_take_effect(tmp_path, monkeypatch, caplog):
    stopped_at(tmp_path, monkeypatch, 2)
    resumed = run_training(tiny_run_config(tmp_path, *SCHEDULE, "train.weight_decay=0.1", "train.adam_beta2=0.9",
                                           "train.resume_from_checkpoint=latest"), show_progress=False)
    assert "train.adam_beta2 0.999 -> 0.9" in caplog.text and "train.weight_decay 0.0 -> 0.1" in caplog.text
    del resumed  # the optimizer itself is not returned: check what the next checkpoint holds
    groups = json.loads((tmp_path / "run" / "checkpoint-8" / "optimizer.json").read_text())["param_groups"]
    assert {tuple(g["betas"]) for g in groups} == {(0.9, 0.9)}
    assert {g["weight_decay"] for g in groups} == {0.1}  # LoRA trains matrices only: all decay


def test_the_loss_window_continues_across_a_resume(tmp_path, monkeypatch):
    """logging_steps=3, stopped at step 4: the line logged at step 6 averages steps 4-6, as without the stop."""
    straight = run_training(tiny_run_config(tmp_path, *SCHEDULE, "train.logging_steps=3", output="straight"),
                            show_progress=False)
    stopped_at(tmp_path, monkeypatch, 4, "train.logging_steps=3")
    resumed = run_training(tiny_run_config(tmp_path, *SCHEDULE, "train.logging_steps=3",
                                           "train.resume_from_checkpoint=latest"), show_progress=False)
    assert train_losses(tmp_path / "run") == train_losses(tmp_path / "straight")
    assert sorted(train_losses(tmp_path / "run")) == [3, 6, 8]
    assert resumed.train_loss == straight.train_loss


def test_training_time_continues_across_a_resume(tmp_path, monkeypatch):
    stopped_at(tmp_path, monkeypatch, 4)
    before = read_trainer_state(tmp_path / "run" / "checkpoint-4")["meter"]["seconds_before"]
    resumed = run_training(tiny_run_config(tmp_path, *SCHEDULE, "train.resume_from_checkpoint=latest"),
                           show_progress=False)
    assert before > 0 and resumed.train_seconds > before
    summary = json.loads((tmp_path / "run" / "train_results.json").read_text())
    assert summary["train_seconds"] == pytest.approx(resumed.train_seconds, abs=0.01)


def test_resuming_a_finished_run_reports_its_loss(tmp_path):
    finished = run_training(tiny_run_config(tmp_path, *SCHEDULE), show_progress=False)
    again = run_training(tiny_run_config(tmp_path, *SCHEDULE, "train.resume_from_checkpoint=latest"),
                         show_progress=False)
    assert again.steps == 8 and again.train_loss is not None and again.train_loss == finished.train_loss
    assert json.loads((tmp_path / "run" / "train_results.json").read_text())["train_loss"] == finished.train_loss


def test_the_same_global_batch_split_differently_is_accepted(tmp_path, monkeypatch, caplog):
    stopped_at(tmp_path, monkeypatch, 2)
    resumed = run_training(tiny_run_config(tmp_path, *SCHEDULE, "train.batch_size=2",
                                           "train.gradient_accumulation_steps=2",
                                           "train.resume_from_checkpoint=latest"), show_progress=False)
    assert resumed.steps == 8
    assert "train.batch_size 4 -> 2 (same global batch)" in caplog.text


def test_other_validation_data_is_accepted_with_a_warning(tmp_path, monkeypatch, caplog):
    from tests.train_fixtures import format_rows, write_rows

    val_a = write_rows(tmp_path / "val-a.json", format_rows("alpaca", 4))
    val_b = write_rows(tmp_path / "val-b.json", format_rows("alpaca", 6))
    stopped_at(tmp_path, monkeypatch, 2, f"data.val_path={val_a}")
    run_training(tiny_run_config(tmp_path, *SCHEDULE, f"data.val_path={val_b}",
                                 "train.resume_from_checkpoint=latest"), show_progress=False)
    assert "validation data" in caplog.text and "val-b.json" in caplog.text
