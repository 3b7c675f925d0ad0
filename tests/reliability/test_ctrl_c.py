"""Ctrl-C: the first one finishes the step, writes a complete checkpoint and ends the run cleanly; resuming
continues exactly. A second Ctrl-C aborts at once without leaving half a checkpoint behind.

The real-signal test runs training in a child process that stops before step k and waits for the signal
on a wakeup fd (no sleeps, no race: the byte is written when the signal is delivered, whenever the waiting
starts); the parent sends SIGINT when the child says it is waiting.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from lorakit.train import checkpoint as ckpt
from lorakit.train import loop
from lorakit.train.loop import run_training
from tests.train_fixtures import (
    assert_same_tensors, base_run_dict, checkpoint_weights, metrics_records, tiny_run_config, train_losses,
    trained_weights,
)

SETTINGS = ("train.max_steps=8", "train.save_steps=2", "train.warmup_steps=2", "adapter.lora_dropout=0.2")

CHILD = textwrap.dedent('''
    import json, os, select, signal, sys
    import torch
    from lorakit.train import loop
    from lorakit.train.config import load_run_config

    torch.set_num_threads(1)
    raw, overrides, wait_before_step = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
    real_train_step, calls = loop._train_step, []

    def train_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == wait_before_step:
            read_end, write_end = os.pipe()
            os.set_blocking(write_end, False)
            signal.set_wakeup_fd(write_end)  # the C-level handler writes here on delivery
            print("WAITING", flush=True)
            select.select([read_end], [], [], 120)
            signal.set_wakeup_fd(-1)
        return real_train_step(*args, **kwargs)

    loop._train_step = train_step
    result = loop.run_training(load_run_config(None, overrides, base=raw), show_progress=False)
    print(f"RESULT steps={result.steps} interrupted={result.interrupted}", flush=True)
''')


def run_child_and_press_ctrl_c(tmp_path, wait_before_step: int) -> subprocess.CompletedProcess:
    raw = base_run_dict(tmp_path, output="interrupted")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    with open(tmp_path / "child.stderr", "w+", encoding="utf-8") as errors:  # a file: a full pipe cannot block it
        child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(raw), json.dumps(SETTINGS),
                                  str(wait_before_step)], stdout=subprocess.PIPE, stderr=errors, text=True, env=env)
        try:
            for line in child.stdout:
                if line.strip() == "WAITING":
                    child.send_signal(signal.SIGINT)
                    break
            stdout, _ = child.communicate(timeout=300)
        finally:
            if child.poll() is None:
                child.kill()
        errors.seek(0)
        return subprocess.CompletedProcess(child.args, child.returncode, stdout, errors.read())


def test_ctrl_c_saves_a_complete_checkpoint_exits_cleanly_and_resumes_exactly(tmp_path):
    # Ctrl-C during step 5: step 5 completes, checkpoint-5 is written (besides the periodic checkpoint-4)
    done = run_child_and_press_ctrl_c(tmp_path, wait_before_step=5)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "RESULT steps=5 interrupted=True" in done.stdout
    assert "Ctrl-C: finishing this step and saving a checkpoint" in done.stdout

    out = tmp_path / "interrupted"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-4", "checkpoint-5"]
    state = ckpt.read_trainer_state(out / "checkpoint-5")
    assert state["position"] == {"step": 5, "epoch": 0, "batch_in_epoch": 5}
    for name in ("trainable.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json",
                 "rng-rank0.safetensors", "rng-rank0.json", "adapter_model.safetensors", "adapter_config.json"):
        assert (out / "checkpoint-5" / name).is_file(), name
    assert checkpoint_weights(out / "checkpoint-5")  # loadable, not truncated
    assert [r["step"] for r in metrics_records(out)] == [1, 2, 3, 4, 5]  # every line complete JSON
    assert not (out / "train_results.json").exists() and not (out / "adapter").exists()
    assert not [p for p in out.iterdir() if ".tmp" in p.name]

    resumed = run_training(tiny_run_config(tmp_path, *SETTINGS, "train.resume_from_checkpoint=latest",
                                           output="interrupted"), show_progress=False)
    straight = run_training(tiny_run_config(tmp_path, *SETTINGS, output="straight"), show_progress=False)
    assert resumed.steps == 8
    # another process, same torch build and thread count: still bit-identical on CPU
    assert_same_tensors(trained_weights(resumed.model), trained_weights(straight.model))
    assert train_losses(out) == train_losses(tmp_path / "straight")
    assert (out / "train_results.json").is_file() and (out / "adapter" / "adapter_model.safetensors").is_file()


def test_second_ctrl_c_aborts_without_publishing_half_a_checkpoint(tmp_path, monkeypatch):
    """First Ctrl-C during step 3; the second arrives while checkpoint-3 is being written."""
    real_train_step, real_write = loop._train_step, ckpt.write_training_state
    calls = []

    def train_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)  # delivered to this (main) thread, handled right away
        return real_train_step(*args, **kwargs)

    def write_training_state(directory, *args, **kwargs):
        if os.path.basename(directory).startswith("checkpoint-3"):
            signal.raise_signal(signal.SIGINT)
        return real_write(directory, *args, **kwargs)

    monkeypatch.setattr(loop, "_train_step", train_step)
    monkeypatch.setattr(ckpt, "write_training_state", write_training_state)
    handler_before = signal.getsignal(signal.SIGINT)
    cfg = tiny_run_config(tmp_path, "train.max_steps=6", "train.save_steps=2")
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, show_progress=False)

    assert signal.getsignal(signal.SIGINT) is handler_before  # the trainer's handler is removed again
    out = tmp_path / "run"
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(out)] == ["checkpoint-2"]
    assert not (out / "checkpoint-3").exists()
    assert ckpt.read_trainer_state(out / "checkpoint-2")["position"]["step"] == 2
    resumed = run_training(tiny_run_config(tmp_path, "train.max_steps=6", "train.save_steps=2",
                                           "train.resume_from_checkpoint=latest"), show_progress=False)
    assert resumed.steps == 6 and not resumed.interrupted
