"""Checkpoints are atomic (a failed write leaves the previous ones intact and publishes nothing), keep the
newest save_total_limit, and each holds a usable adapter."""

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorakit import PeftModel
from lorakit.atomic import DiskFullError
from lorakit.train import checkpoint as ckpt
from lorakit.train.loop import run_training
from tests.train_fixtures import assert_same_tensors, checkpoint_weights, tiny_run_config


def file_bytes(directory) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(Path(directory).iterdir())}


def test_failure_while_writing_a_checkpoint_keeps_the_previous_one_and_publishes_nothing(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save_file, snapshot = ckpt.save_file, {}

    def failing_save_file(tensors, path, *args, **kwargs):
        """Disk full after the first file of checkpoint-4."""
        temp = os.path.dirname(path)
        if os.path.basename(temp) == "checkpoint-4.tmp" and os.listdir(temp):
            snapshot.update(file_bytes(out / "checkpoint-2"))
            raise OSError(28, "No space left on device")
        return real_save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", failing_save_file)
    with pytest.raises(DiskFullError, match=r"disk full: could not write checkpoint-4 in .*run \(it needs about "
                                            r"[\d.]+ KB, .* free there\); the partial files were removed\. The last "
                                            r"complete checkpoint, .*checkpoint-2, is intact"):
        run_training(tiny_run_config(tmp_path, "train.max_steps=6", "train.save_steps=2"), show_progress=False)
    monkeypatch.undo()

    assert snapshot, "the failure was not injected"
    assert not (out / "checkpoint-4").exists()
    assert ckpt.list_checkpoints(out) == [str(out / "checkpoint-2")]
    assert file_bytes(out / "checkpoint-2") == snapshot  # the previous checkpoint is untouched
    assert ckpt.resolve_checkpoint("latest", str(out)) == str(out / "checkpoint-2")

    resumed = run_training(tiny_run_config(tmp_path, "train.max_steps=6", "train.save_steps=2",
                                           "train.resume_from_checkpoint=latest"), show_progress=False)
    assert resumed.steps == 6
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name or ".old" in p.name]


def test_a_temporary_directory_is_never_taken_for_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoint-9.tmp").mkdir(parents=True)
    (out / "checkpoint-8").mkdir()  # a directory without trainer_state.json: incomplete
    assert ckpt.list_checkpoints(str(out)) == []
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ckpt.resolve_checkpoint("latest", str(out))


@pytest.mark.parametrize("limit, kept", [(2, [4, 5]), (1, [5]), (None, [1, 2, 3, 4, 5])])
def test_save_total_limit_keeps_the_newest_checkpoints(tmp_path, limit, kept):
    limit_setting = f"train.save_total_limit={'null' if limit is None else limit}"
    cfg = tiny_run_config(tmp_path, "train.max_steps=5", "train.save_steps=1", limit_setting, "train.learning_rate=1e-3")
    run_training(cfg, show_progress=False)
    out = tmp_path / "run"
    assert ckpt.list_checkpoints(str(out)) == [str(out / f"checkpoint-{k}") for k in kept]
    on_disk = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint"))
    assert on_disk == sorted(f"checkpoint-{k}" for k in kept)


def test_saving_a_step_again_replaces_the_checkpoint_in_place(tmp_path):
    """Resuming from checkpoint-2 re-saves checkpoint-4: the old one is swapped out, never lost half-way."""
    settings = ("train.max_steps=4", "train.save_steps=2", "train.save_total_limit=null")
    run_training(tiny_run_config(tmp_path, *settings), show_progress=False)
    out = tmp_path / "run"
    first = checkpoint_weights(out / "checkpoint-4")
    run_training(tiny_run_config(tmp_path, *settings, f"train.resume_from_checkpoint={out / 'checkpoint-2'}"),
                 show_progress=False)
    assert ckpt.list_checkpoints(str(out)) == [str(out / "checkpoint-2"), str(out / "checkpoint-4")]
    assert_same_tensors(checkpoint_weights(out / "checkpoint-4"), first)  # deterministic: the same weights again
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name or ".old" in p.name]


def test_a_checkpoint_holds_a_loadable_adapter_equal_to_the_trained_weights(tmp_path):
    cfg = tiny_run_config(tmp_path, "train.max_steps=3", "train.save_steps=3")
    run_training(cfg, show_progress=False)
    checkpoint = tmp_path / "run" / "checkpoint-3"
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    model = PeftModel.from_pretrained(base, str(checkpoint))
    loaded = {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}
    saved = checkpoint_weights(checkpoint)
    assert loaded and set(loaded) == set(saved)
    for name, tensor in saved.items():
        assert torch.equal(loaded[name], tensor), name
    assert any(t.abs().sum() > 0 for n, t in saved.items() if "lora_B" in n)  # trained: B left zero
