"""train.threads: the CPU threads of a training process (lorakit/train/threads.py)."""

from __future__ import annotations

import pytest
import torch

from lorakit.train import loop, threads
from lorakit.train.threads import ThreadSetting, check_threads_option, choose_threads
from tests.train_fixtures import tiny_run_config

CPU = torch.device("cpu")
# what torchrun gives each of 2 processes on a node when OMP_NUM_THREADS is not set
TORCHRUN_DEFAULT = {"TORCHELASTIC_RUN_ID": "none", "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("value", ["auto", 1, 4])
def test_valid_settings(value):
    check_threads_option(value)


@pytest.mark.parametrize("value", [0, -2, "four", True, 2.5, None])
def test_invalid_settings_are_clear_errors(value):
    with pytest.raises(ValueError, match="train.threads must be auto or a whole number"):
        check_threads_option(value)


def test_a_bad_value_in_the_run_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="train.threads"):
        tiny_run_config(tmp_path, "train.threads=0")
    assert tiny_run_config(tmp_path, "train.threads=3").train.threads == 3
    assert tiny_run_config(tmp_path).train.threads == "auto"


def test_auto_replaces_torchruns_one_thread_with_the_nodes_cores_per_process():
    count, reason = choose_threads("auto", CPU, TORCHRUN_DEFAULT, cores=64)
    assert count == 32 and "64 cores / 2 processes" in reason and "train.threads: 1" in reason
    assert choose_threads("auto", CPU, {**TORCHRUN_DEFAULT, "LOCAL_WORLD_SIZE": "3"}, cores=64)[0] == 21


@pytest.mark.parametrize("environ, cores", [
    ({}, 64),  # one process: PyTorch's own choice
    ({"OMP_NUM_THREADS": "1"}, 64),  # set by the user, no torchrun
    ({**TORCHRUN_DEFAULT, "OMP_NUM_THREADS": "8"}, 64),  # set by the user under torchrun
    ({k: v for k, v in TORCHRUN_DEFAULT.items() if k != "OMP_NUM_THREADS"}, 64),  # torchrun, one process per node
    ({**TORCHRUN_DEFAULT, "LOCAL_WORLD_SIZE": "1"}, 64),
    (TORCHRUN_DEFAULT, 3),  # 3 cores for 2 processes: one thread each is already right
])
def test_auto_leaves_the_count_alone_otherwise(environ, cores):
    assert choose_threads("auto", CPU, environ, cores=cores) == (None, "")


def _topology(root, cores_of_cpus):
    for cpu, (package, core) in cores_of_cpus.items():
        path = root / f"cpu{cpu}" / "topology"
        path.mkdir(parents=True)
        (path / "physical_package_id").write_text(f"{package}\n")
        (path / "core_id").write_text(f"{core}\n")
    return str(root)


def test_cores_count_the_hyperthreads_of_one_core_once(tmp_path, monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    two_threads_per_core = {0: (0, 0), 1: (0, 1), 2: (0, 0), 3: (0, 1)}
    assert threads.available_cores(_topology(tmp_path / "smt", two_threads_per_core)) == 2
    two_sockets = {0: (0, 0), 1: (1, 0), 2: (0, 1), 3: (1, 1)}
    assert threads.available_cores(_topology(tmp_path / "sockets", two_sockets)) == 4
    assert threads.available_cores(str(tmp_path / "unreadable")) == 4  # no topology: the logical CPUs


def test_auto_leaves_gpu_runs_alone_and_a_number_is_used_as_given():
    assert choose_threads("auto", torch.device("cuda", 0), TORCHRUN_DEFAULT, cores=64) == (None, "")
    assert choose_threads(3, torch.device("cuda", 0), {}, cores=64)[0] == 3
    assert choose_threads(5, CPU, TORCHRUN_DEFAULT, cores=2)[0] == 5


def test_the_setting_is_given_back_on_exit():
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    with ThreadSetting(target, CPU):
        assert torch.get_num_threads() == target
    assert torch.get_num_threads() == before


def _record_threads(seen):
    def fake_train(cfg, ctx, overwrite, loaded, show_progress, return_model):
        seen.append(torch.get_num_threads())
        return "result"
    return fake_train


def test_the_trainer_trains_on_the_chosen_threads_and_restores_them(tmp_path, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(loop, "_train", _record_threads(seen))
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    assert loop.run_training(tiny_run_config(tmp_path, f"train.threads={target}"), show_progress=False) == "result"
    assert seen == [target] and torch.get_num_threads() == before
    assert f"threads: {target} per process (train.threads)" in capsys.readouterr().out


def test_the_trainer_under_torchruns_default_uses_the_nodes_cores(tmp_path, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(loop, "_train", _record_threads(seen))
    monkeypatch.setattr(threads, "available_cores", lambda: 6)
    for name, value in TORCHRUN_DEFAULT.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("WORLD_SIZE", raising=False)  # one process here, as torchrun's env for the node says 2
    before = torch.get_num_threads()
    loop.run_training(tiny_run_config(tmp_path), show_progress=False)
    assert seen == [3] and torch.get_num_threads() == before
    assert "threads: 3 per process (torchrun's OMP_NUM_THREADS=1 replaced: 6 cores / 2 processes" in \
        capsys.readouterr().out
