"""Exact resume: stop a run at step k (as Ctrl-C does), resume it from the checkpoint, and get bit for bit the
run that was never interrupted: same final weights, same logged losses. Under the default precision (bf16 where
bf16 matmuls are fast, as on this project's CPU): the checkpoint holds the fp32 trained tensors, and a resumed run
casts the same freshly loaded weights to bf16 the same way, so the bf16 run resumes bit for bit too.

Ctrl-C is simulated deterministically: the loop reads `_StopOnCtrlC.requested` once per step, after the
step; `StopAtStep(k)` answers True at the k-th read, as if Ctrl-C had been pressed during step k. The real
signal is exercised in test_ctrl_c.py.
"""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from lorakit.train import loop
from lorakit.train.loop import run_training
from tests.train_fixtures import (
    assert_same_tensors, checkpoint_weights, format_rows, save_tiny_classifier, tiny_run_config, train_losses,
    trained_weights, write_rows,
)

# 24 records, batch 4: 6 steps per epoch, 2 epochs = 12 steps, with warm-up then cosine decay.
SCHEDULE = ("train.max_steps=null", "train.num_epochs=2", "train.warmup_steps=2", "train.save_steps=2",
            "train.save_total_limit=null")
ADALORA = ("adapter={method: adalora, init_r: 6, target_r: 2, tinit: 2, tfinal: 3, deltaT: 2, lora_dropout: 0.1, "
           "target_modules: all-linear}")


class StopAtStep(loop._StopOnCtrlC):
    """Reports a Ctrl-C request at the k-th check, i.e. at the end of optimizer step k."""

    def __init__(self, step: int) -> None:
        self.stop_step, self.checks = step, 0
        super().__init__()

    @property
    def requested(self) -> bool:
        self.checks += 1
        return self.checks >= self.stop_step

    @requested.setter
    def requested(self, value: bool) -> None:  # __init__ sets it; the check count decides
        pass


def interrupt_and_resume(tmp_path, monkeypatch, stop_step: int, *overrides: str):
    """(the interrupted run's result, the resumed run's result), both in tmp_path/interrupted."""
    cfg = tiny_run_config(tmp_path, *SCHEDULE, *overrides, output="interrupted")
    with monkeypatch.context() as patch:
        patch.setattr(loop, "_StopOnCtrlC", lambda: StopAtStep(stop_step))
        first = run_training(cfg, show_progress=False)
    # an interrupted run leaves its checkpoint, not the final results
    assert not (tmp_path / "interrupted" / "train_results.json").exists()
    resume = tiny_run_config(tmp_path, *SCHEDULE, *overrides, "train.resume_from_checkpoint=latest",
                             output="interrupted")
    return first, run_training(resume, show_progress=False)


CASES = {
    "lora mid-epoch": (3, ()),
    "lora at the epoch boundary": (6, ()),
    "lora at the last step": (12, ()),
    "lora with dropout (RNG restored)": (5, ("adapter.lora_dropout=0.3",)),
    "lora with gradient accumulation and LoRA+": (
        4, ("train.batch_size=2", "train.gradient_accumulation_steps=2", "train.loraplus_lr_ratio=4")),
    # under the default precision (bf16 where fast) the residual W0 - s B A is computed in fp32, then stored in bf16
    "pissa (residual base)": (5, ("adapter.init_lora_weights=pissa",)),
    "qlora (lora on an nf4 base)": (5, ("quantization=nf4",)),
    "vera with dropout": (5, ("adapter={method: vera, r: 16, target_modules: all-linear, vera_dropout: 0.2}",)),
    # total_step = the run's 12 steps: budget phase 3..9 (masks at even steps), final pattern at 9, then 10..12
    "adalora mid-schedule (importance EMAs restored)": (5, (ADALORA,)),
    "adalora in the final phase (rank pattern restored)": (10, (ADALORA,)),
    "full finetuning": (5, ("finetuning_type=full", "adapter=null", "train.learning_rate=1e-3")),
    "freeze with weight decay": (
        3, ("finetuning_type=freeze", "adapter=null", "train.freeze_trainable_layers=1", "train.weight_decay=0.1")),
}


@pytest.mark.parametrize("stop_step, overrides", CASES.values(), ids=CASES.keys())
def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path, monkeypatch, stop_step, overrides):
    straight = run_training(tiny_run_config(tmp_path, *SCHEDULE, *overrides, output="straight"), show_progress=False)
    first, resumed = interrupt_and_resume(tmp_path, monkeypatch, stop_step, *overrides)

    assert first.interrupted and first.steps == stop_step
    assert os.path.isdir(tmp_path / "interrupted" / f"checkpoint-{stop_step}")
    assert straight.steps == resumed.steps == 12 and not resumed.interrupted
    # Bit-identical on CPU: same operations in the same order, RNG and optimizer state restored exactly.
    assert_same_tensors(trained_weights(resumed.model), trained_weights(straight.model))
    assert_same_tensors(checkpoint_weights(tmp_path / "interrupted" / "checkpoint-12"),
                        checkpoint_weights(tmp_path / "straight" / "checkpoint-12"))
    # metrics.jsonl reads as one continuous run: every step once, the same losses
    assert train_losses(tmp_path / "interrupted") == train_losses(tmp_path / "straight")


def test_dropout_really_draws_random_numbers(tmp_path):
    """Guards the dropout case above: dropout changes the run, so a resume that lost the RNG state would too."""
    with_dropout = run_training(tiny_run_config(tmp_path, "adapter.lora_dropout=0.3", output="a"),
                                show_progress=False)
    without = run_training(tiny_run_config(tmp_path, output="b"), show_progress=False)
    a, b = trained_weights(with_dropout.model), trained_weights(without.model)
    assert any(not torch.equal(a[name], b[name]) for name in a)


def test_resume_from_an_explicit_checkpoint_directory(tmp_path, monkeypatch):
    straight = run_training(tiny_run_config(tmp_path, *SCHEDULE, output="straight"), show_progress=False)
    cfg = tiny_run_config(tmp_path, *SCHEDULE, output="interrupted")
    with monkeypatch.context() as patch:
        patch.setattr(loop, "_StopOnCtrlC", lambda: StopAtStep(5))
        run_training(cfg, show_progress=False)
    # step 5 was the Ctrl-C save; checkpoint-4 is the last periodic one: resume from it, named explicitly
    checkpoint = str(tmp_path / "interrupted" / "checkpoint-4")
    resumed = run_training(tiny_run_config(tmp_path, *SCHEDULE, f"train.resume_from_checkpoint={checkpoint}",
                                           output="interrupted"), show_progress=False)
    assert_same_tensors(trained_weights(resumed.model), trained_weights(straight.model))
    assert train_losses(tmp_path / "interrupted") == train_losses(tmp_path / "straight")


def test_resumed_classifier_run_is_bit_identical(tmp_path, monkeypatch):
    """SEQ_CLS: LoRA plus a classification head trained in full (modules_to_save), one loss term per example."""
    model = save_tiny_classifier(tmp_path / "bert")
    data = write_rows(tmp_path / "labels.jsonl", format_rows("text_label", 24))
    settings = (*SCHEDULE, "task_type=SEQ_CLS", "adapter.target_modules=[query, value]", "adapter.lora_dropout=0.1")
    straight = run_training(tiny_run_config(tmp_path, *settings, model=model, data=data, output="straight"),
                            show_progress=False)
    with monkeypatch.context() as patch:
        patch.setattr(loop, "_StopOnCtrlC", lambda: StopAtStep(7))
        run_training(tiny_run_config(tmp_path, *settings, model=model, data=data, output="interrupted"),
                     show_progress=False)
    resumed = run_training(tiny_run_config(tmp_path, *settings, "train.resume_from_checkpoint=latest", model=model,
                                           data=data, output="interrupted"), show_progress=False)
    weights = trained_weights(resumed.model)
    assert any("classifier" in name for name in weights)
    assert_same_tensors(weights, trained_weights(straight.model))


def test_resume_after_a_kill_that_cut_the_metrics_file_mid_line(tmp_path, monkeypatch):
    """A SIGKILL (OOM killer, power loss) can leave half a JSON line at the end of metrics.jsonl."""
    straight = run_training(tiny_run_config(tmp_path, *SCHEDULE, output="straight"), show_progress=False)
    cfg = tiny_run_config(tmp_path, *SCHEDULE, output="interrupted")
    with monkeypatch.context() as patch:
        patch.setattr(loop, "_StopOnCtrlC", lambda: StopAtStep(4))
        run_training(cfg, show_progress=False)
    with open(tmp_path / "interrupted" / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"step": 5, "loss": 5.1, "lr"')
    resumed = run_training(tiny_run_config(tmp_path, *SCHEDULE, "train.resume_from_checkpoint=latest",
                                           output="interrupted"), show_progress=False)
    assert_same_tensors(trained_weights(resumed.model), trained_weights(straight.model))
    assert train_losses(tmp_path / "interrupted") == train_losses(tmp_path / "straight")


def test_resumed_adalora_run_allocates_the_same_ranks(tmp_path, monkeypatch):
    """Beyond the weights: the saved rank pattern and the allocation state of the resumed run are the uninterrupted
    run's (the pattern was allocated at step 9, after the resume at step 7)."""
    run_training(tiny_run_config(tmp_path, *SCHEDULE, ADALORA, output="straight"), show_progress=False)
    interrupt_and_resume(tmp_path, monkeypatch, 7, ADALORA)
    for name in ("adapter/adapter_config.json", "checkpoint-8/hooks.json", "checkpoint-12/hooks.json"):
        straight = json.loads((tmp_path / "straight" / name).read_text())
        resumed = json.loads((tmp_path / "interrupted" / name).read_text())
        assert straight == resumed, name
    pattern = json.loads((tmp_path / "straight" / "adapter/adapter_config.json").read_text())["rank_pattern"]
    assert sum(sum(kept) for kept in pattern.values()) == 2 * len(pattern)
    straight_emas = load_file(tmp_path / "straight" / "checkpoint-8" / "hooks.safetensors")
    resumed_emas = load_file(tmp_path / "interrupted" / "checkpoint-8" / "hooks.safetensors")
    assert_same_tensors(resumed_emas, straight_emas)
