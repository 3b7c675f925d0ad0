"""Faults: kill -9 at random moments of an --overwrite and of a merge, two runs on one output_dir, a stale lock,
disk full (injected ENOSPC, and a real full tmpfs where it can be mounted), and Ctrl-C while starting up.

The promises: a kill never costs the user the earlier run (or model) and never leaves half of anything for
the next run to trip over; disk full is one line naming what could not be written and the space it needs,
with the temporary files gone and the last complete checkpoint intact. No sleeps: processes synchronise on
pipes, kills are deterministic (the k-th write, k seeded).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file

import lorakit.adapter_files
from lorakit.atomic import DiskFullError, clean_interrupted_writes
from lorakit.cli.main import main
from lorakit.train import checkpoint as ckpt
from lorakit.train.loop import run_training
from tests.reliability.workspace import snapshot
from tests.train_fixtures import base_run_dict, format_rows, save_tiny_llama, tiny_run_config, write_rows

HERE = Path(__file__).parent
LEFTOVER = re.compile(r"\.(tmp|old)|^\.previous-run$|^\.lorakit\.lock$")


def leftovers(directory: Path) -> list[str]:
    return [p.name for p in Path(directory).iterdir() if LEFTOVER.search(p.name)]


def run_harness(tmp_path: Path, template: Path, argv: list[str], kills: int, seed: int) -> dict:
    work = tmp_path / "work"
    work.mkdir()
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"template": str(template), "work": str(work), "argv": [str(a) for a in argv],
                                "kills": kills, "seed": seed}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run([sys.executable, str(HERE / "kill_harness.py"), str(plan)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["whole"]["code"] == 0, (report, (work / "whole.log").read_text()[-3000:])
    return report


# ---- kill -9 ---------------------------------------------------------------------------------------
def test_kill_9_at_random_moments_of_an_overwrite_never_loses_the_earlier_run(tmp_path, capsys):
    """The new run (3 steps, a checkpoint each) replaces a finished run with --overwrite and is killed at a random
    write. The next lorakit run on the directory finds either the earlier run, byte for byte, or the new run with
    a complete checkpoint; never both half, never leftovers; and training it again works."""
    shared = tmp_path / "shared"
    model = save_tiny_llama(shared / "model")
    data = write_rows(shared / "train.json", format_rows("alpaca", 24))
    config = shared / "run.yaml"
    raw = base_run_dict(shared, model=model, data=data)
    raw["train"].update(max_steps=3, save_steps=1)
    config.write_text(json.dumps(raw))  # JSON is YAML
    template = tmp_path / "template"
    run_training(tiny_run_config(template, "train.max_steps=2", "train.save_steps=1", model=model, data=data),
                 show_progress=False)
    earlier = snapshot(template / "run")
    argv = ["train", config, "output_dir={dir}/run", "--overwrite", "--no-progress"]

    kills = int(os.environ.get("OVERWRITE_KILLS", 6))  # raise it to try more (or all) kill points
    report = run_harness(tmp_path, template, argv, kills=kills, seed=6)
    assert report["writes"] > 20 and len(report["runs"]) == min(kills, report["writes"])
    outcomes = []
    for run in report["runs"]:
        out = Path(run["dir"]) / "run"
        assert run["killed"], run
        # the next run on the directory (here: one that must refuse, as the directory holds a run) repairs it
        code = main(["train", str(config), f"output_dir={out}", "--no-progress"])
        assert code == 1 and "already holds a run" in capsys.readouterr().err
        assert leftovers(out) == [], (run, sorted(os.listdir(out)))
        if snapshot(out) == earlier:
            outcomes.append("earlier run intact")
        else:  # the new run got as far as a complete checkpoint: it is the run now, and resumable
            found = ckpt.list_checkpoints(str(out))
            assert found, (run, sorted(os.listdir(out)))
            state = ckpt.read_trainer_state(found[-1])
            assert state["config"]["train"]["max_steps"] == 3  # the new run's, not the earlier run's
            assert load_file(os.path.join(found[-1], "trainable.safetensors"))
            outcomes.append("new run with a checkpoint")
            assert main(["train", str(config), f"output_dir={out}", "train.resume_from_checkpoint=latest",
                         "--no-progress"]) == 0
    assert main(["train", str(config), f"output_dir={Path(report['runs'][0]['dir']) / 'run'}", "--overwrite",
                 "--no-progress"]) == 0
    assert len(set(outcomes)) == 2, outcomes  # the seeded kill points hit both sides of the commit


def test_kill_9_at_random_moments_of_a_merge_never_loses_the_earlier_output_or_leaves_temporaries(tmp_path):
    shared = tmp_path / "shared"
    model = save_tiny_llama(shared / "model")
    run_training(tiny_run_config(shared, "train.max_steps=1", model=model), show_progress=False)
    adapter = shared / "run" / "adapter"
    template = tmp_path / "template"
    (template / "merged").mkdir(parents=True)
    (template / "merged" / "config.json").write_text('{"an": "earlier merged model"}')
    earlier, adapter_files = snapshot(template / "merged"), snapshot(adapter)
    argv = ["merge", "--adapter", adapter, "--output", "{dir}/merged", "--overwrite"]

    kills = int(os.environ.get("MERGE_KILLS", 4))
    report = run_harness(tmp_path, template, argv, kills=kills, seed=1)
    assert len(report["runs"]) == min(kills, report["writes"])
    for run in report["runs"]:
        directory = Path(run["dir"])
        assert run["killed"], run
        clean_interrupted_writes(str(directory), only="merged")  # what the next merge into it does first
        assert leftovers(directory) == [], (run, sorted(os.listdir(directory)))
        merged = snapshot(directory / "merged")
        assert merged == earlier or ("model.safetensors" in merged and "config.json" in merged), (run, merged)
        assert snapshot(adapter) == adapter_files
        assert main(["merge", "--adapter", str(adapter), "--output", str(directory / "merged"), "--overwrite"]) == 0
        assert leftovers(directory) == []


# ---- two runs, one directory -------------------------------------------------------------------------
HOLDER = textwrap.dedent('''
    import json, sys
    import torch
    from lorakit.train import loop
    from lorakit.train.config import load_run_config

    torch.set_num_threads(1)
    real_step, calls = loop._train_step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            print("WAITING", flush=True)
            sys.stdin.readline()  # the parent answers once it has tried its own run
        return real_step(*args, **kwargs)

    loop._train_step = step
    result = loop.run_training(load_run_config(None, [], base=json.loads(sys.argv[1])), overwrite=True,
                               show_progress=False)
    print(f"RESULT steps={result.steps}", flush=True)
''')


def test_a_second_run_on_the_same_output_dir_is_refused_naming_the_first(tmp_path, capsys):
    raw = base_run_dict(tmp_path)
    raw["train"].update(max_steps=4, save_steps=1)
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "first.stderr", "w+") as errors:
        first = subprocess.Popen([sys.executable, "-c", HOLDER, json.dumps(raw)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=errors, text=True, env=env)
        try:
            assert first.stdout.readline().strip() == "WAITING", errors.read()
            out = Path(raw["output_dir"])
            during = snapshot(out)
            code = main(["train", str(config), "--overwrite", "--no-progress"])
            err = capsys.readouterr().err
            assert snapshot(out) == during  # the second run touched nothing
            first.stdin.write("go\n")
            first.stdin.flush()
            stdout, _ = first.communicate(timeout=300)
        finally:
            if first.poll() is None:
                first.kill()
    assert code == 1
    assert re.search(rf"output_dir '.*run' is in use by another lorakit process: pid {first.pid} on \S+, started "
                     r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", err), err
    assert first.returncode == 0 and "RESULT steps=4" in stdout
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # one run's records, not two interleaved
    assert leftovers(out) == []  # the lock file goes with its run


def test_a_stale_lock_of_a_dead_run_is_taken_over(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lorakit.lock").write_text(json.dumps({"pid": int(dead.stdout), "host": "h", "started": "yesterday"}))
    result = run_training(tiny_run_config(tmp_path, "train.max_steps=1"), show_progress=False)
    assert result.steps == 1
    assert f"taking over the lock of pid {int(dead.stdout)} (started yesterday), which is no longer running" in \
        caplog.text
    assert leftovers(out) == []


# ---- disk full ---------------------------------------------------------------------------------------
def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def fail_adapter_save_in(monkeypatch, marker: str) -> None:
    real = lorakit.adapter_files.save_file

    def save_file(tensors, path, *args, **kwargs):
        if marker in path:
            enospc()
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(lorakit.adapter_files, "save_file", save_file)


def test_disk_full_at_the_final_save_without_checkpoints_says_so_and_leaves_nothing_half(tmp_path, monkeypatch):
    fail_adapter_save_in(monkeypatch, "adapter.tmp-")
    with pytest.raises(DiskFullError) as err:
        run_training(tiny_run_config(tmp_path, "train.max_steps=2"), show_progress=False)
    message = str(err.value)
    assert re.match(r"disk full: could not write the final adapter in .*run \(it needs about [\d.]+ KB, .* free "
                    r"there\); the partial files were removed\. No checkpoint holds this run's weights", message)
    out = tmp_path / "run"
    assert not (out / "adapter").exists() and leftovers(out) == []


def test_disk_full_at_the_final_save_points_to_the_last_checkpoint_and_resume_finishes(tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        fail_adapter_save_in(patch, "adapter.tmp-")
        with pytest.raises(DiskFullError, match=r"The trained weights are in the last checkpoint, .*checkpoint-3: "
                                                r"once there is space, finish with train\.resume_from_checkpoint=latest"):
            run_training(tiny_run_config(tmp_path, "train.max_steps=3", "train.save_steps=3"), show_progress=False)
    finished = run_training(tiny_run_config(tmp_path, "train.max_steps=3", "train.save_steps=3",
                                            "train.resume_from_checkpoint=latest"), show_progress=False)
    summary = json.loads((tmp_path / "run" / "train_results.json").read_text())
    assert finished.train_loss is not None and summary["train_loss"] == pytest.approx(finished.train_loss)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_disk_full_during_an_overwrite_gives_the_earlier_run_back(tmp_path, monkeypatch, capsys, caplog):
    run_training(tiny_run_config(tmp_path, "train.max_steps=2", "train.save_steps=1"), show_progress=False)
    earlier = snapshot(tmp_path / "run")
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(base_run_dict(tmp_path)))
    fail_adapter_save_in(monkeypatch, "checkpoint-")  # the new run's first checkpoint
    code = main(["train", str(config), "train.save_steps=1", "--overwrite", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1
    assert re.search(r"lorakit: error: disk full: could not write checkpoint-1 in .*run \(it needs about .*No "
                     r"checkpoint was saved yet", err), err
    assert "the earlier run there was put back as it was" in caplog.text
    assert snapshot(tmp_path / "run") == earlier


def test_disk_full_while_merging_leaves_no_temporary_directory(tmp_path, monkeypatch, capsys):
    import transformers.modeling_utils

    model = save_tiny_llama(tmp_path / "model")
    run_training(tiny_run_config(tmp_path, "train.max_steps=1", model=model), show_progress=False)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "config.json").write_text('{"an": "earlier merged model"}')
    earlier = snapshot(out)
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", enospc)
    code = main(["merge", "--adapter", str(tmp_path / "run"), "--output", str(out), "--overwrite"])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert re.match(r"lorakit: error: disk full: could not write the merged model '.*merged' in .* \(it needs about "
                    r"[\d.]+ KB, .*\); the partial files were removed\. The adapter and any earlier OUT are untouched",
                    err), err
    assert snapshot(out) == earlier and leftovers(tmp_path) == []


def test_disk_full_while_logging_metrics_is_one_line(tmp_path, monkeypatch, capsys):
    from lorakit.train import run_log

    real_open = open
    calls = []

    def open_failing_on_metrics(path, mode="r", *args, **kwargs):
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            calls.append(path)
            if len(calls) == 2:
                enospc()
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(run_log, "open", open_failing_on_metrics, raising=False)
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(base_run_dict(tmp_path)))
    code = main(["train", str(config), "train.save_steps=1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1
    assert re.search(r"lorakit: error: disk full: could not write a line of metrics\.jsonl in .*run", err), err
    assert ckpt.list_checkpoints(str(tmp_path / "run")) == [str(tmp_path / "run" / "checkpoint-1")]


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 160 KB tmpfs (needs root; skipped elsewhere): the tiny run's checkpoints fill it after a few steps."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


def test_a_really_full_disk_keeps_the_last_complete_checkpoint(tmp_path, small_tmpfs, capsys):
    config = tmp_path / "run.yaml"
    raw = base_run_dict(tmp_path, output="unused")
    raw["train"].update(max_steps=40, save_steps=1, save_total_limit=None)
    config.write_text(json.dumps(raw))
    out = small_tmpfs / "run"
    code = main(["train", str(config), f"output_dir={out}", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1
    match = re.search(r"lorakit: error: disk full: could not write (checkpoint-\d+) in .*run \(it needs about "
                      r"[\d.]+ KB, [\d.]+ (bytes|KB) free there\); the partial files were removed\. The last complete "
                      r"checkpoint, (.*checkpoint-\d+), is intact", err)
    assert match, err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1
    assert leftovers(out) == []
    assert load_file(os.path.join(match[3], "trainable.safetensors"))  # the last checkpoint is whole
    assert ckpt.list_checkpoints(str(out))[-1] == match[3]


# ---- Ctrl-C at start-up --------------------------------------------------------------------------------
INTERRUPT_AT_TORCH_IMPORT = textwrap.dedent('''
    import os, signal, sys

    class InterruptTorchImport:
        """Ctrl-C arrives while `import torch` starts (a real SIGINT, delivered at once)."""
        def find_spec(self, name, path=None, target=None):
            if name == "torch":
                sys.meta_path.remove(self)
                os.kill(os.getpid(), signal.SIGINT)
            return None

    sys.meta_path.insert(0, InterruptTorchImport())
''')


def test_ctrl_c_while_the_command_starts_exits_130_without_a_traceback(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(INTERRUPT_AT_TORCH_IMPORT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "lorakit", "train", "--help"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 130, done.stderr[-2000:]
    assert done.stderr.strip() == "lorakit: interrupted" and done.stdout == ""


def test_ctrl_c_while_loading_a_command_exits_130_quietly(monkeypatch, capsys):
    import importlib

    def interrupted(name, *args):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib, "import_module", interrupted)
    assert main(["train", "--help"]) == 130
    assert capsys.readouterr().err.strip() == "lorakit: interrupted"


def test_a_library_user_keeps_the_default_ctrl_c_handler():
    """Only the `lorakit` command exits quietly on Ctrl-C while importing; a program importing lorakit does not."""
    from lorakit.cli import startup

    assert not startup.running_as_command()  # pytest imports lorakit as a library
    startup.install()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_killed_merge_leaves_nothing_behind_for_long(tmp_path, capsys):
    """What a merge killed mid-swap leaves (the old output set aside, the new one half-written) is repaired by the
    next merge into the same directory."""
    model = save_tiny_llama(tmp_path / "model")
    run_training(tiny_run_config(tmp_path, "train.max_steps=1", model=model), show_progress=False)
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    (tmp_path / f"merged.tmp-{dead}").mkdir()
    (tmp_path / f"merged.tmp-{dead}" / "model.safetensors").write_bytes(b"\0" * 1000)
    (tmp_path / f"merged.old-{dead}").mkdir()
    (tmp_path / f"merged.old-{dead}" / "config.json").write_text('{"an": "earlier merged model"}')
    code = main(["merge", "--adapter", str(tmp_path / "run"), "--output", str(tmp_path / "merged")])
    assert code == 1 and "already exists and is not empty" in capsys.readouterr().err  # the earlier one is back
    assert (tmp_path / "merged" / "config.json").read_text() == '{"an": "earlier merged model"}'
    assert leftovers(tmp_path) == []
    shutil.rmtree(tmp_path / "merged")


def test_repairing_an_output_dir_touches_only_lorakit_files(tmp_path):
    """A user's own files that merely look like leftovers (notes.old, draft.tmp) stay as they are."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.old").write_text("mine")
    (out / "draft.tmp").write_text("mine too")
    (out / "checkpoint-3.tmp").mkdir()  # lorakit's: a checkpoint being written when the run was killed
    run_training(tiny_run_config(tmp_path, "train.max_steps=1"), show_progress=False)
    assert (out / "notes.old").read_text() == "mine" and (out / "draft.tmp").read_text() == "mine too"
    assert not (out / "checkpoint-3.tmp").exists()
