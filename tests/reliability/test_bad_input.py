"""Bad input fails with a clear error (what is wrong, where, what to do) and never costs an earlier run its
files, even with overwrite=True: the old run is only replaced once the model and data have loaded."""

import json
import os
from pathlib import Path

import pytest

from lorakit.train.loop import run_training
from lorakit.train.setup import RunError
from tests.train_fixtures import format_rows, save_tiny_llama, tiny_run_config, write_rows


def tree_bytes(root) -> dict[str, bytes]:
    """Every file under root (relative path -> content)."""
    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def earlier_run(tmp_path) -> dict[str, bytes]:
    """A finished run in tmp_path/run (with checkpoints); returns its files."""
    run_training(tiny_run_config(tmp_path, "train.max_steps=2", "train.save_steps=1"), show_progress=False)
    return tree_bytes(tmp_path / "run")


def alpaca_without_output(path: Path) -> str:
    return write_rows(path, [{"instruction": "hi", "input": "", "response": "hello"}] * 4)


BAD_DATA = {
    "missing data file": (lambda d: str(d / "nope.jsonl"), (), FileNotFoundError,
                          r"Data file not found: .*nope\.jsonl.*\.json, \.jsonl, \.csv, \.parquet"),
    "format with a missing field": (alpaca_without_output, ("data.format=alpaca",), ValueError,
                                    r"record 0: missing required field 'output'.*columns found: "
                                    r"\['input', 'instruction', 'response'\]"),
    "undetectable format": (lambda d: write_rows(d / "qa.json", [{"question": "q", "answer": "a"}]), (), ValueError,
                            r"Cannot detect the data format.*\['answer', 'question'\].*alpaca: instruction, output"),
    "empty dataset": (lambda d: write_rows(d / "empty.json", []), (), ValueError, r"has no records"),
    "all labels masked": (lambda d: write_rows(d / "long.json", format_rows("alpaca", 8)), ("data.cutoff_len=8",),
                          ValueError, r"every label is masked in all 8 examples: cutoff_len=8.*Raise cutoff_len"),
}


@pytest.mark.parametrize("make_data, overrides, error, message", BAD_DATA.values(), ids=BAD_DATA.keys())
def test_bad_data_fails_clearly_and_keeps_the_earlier_run(tmp_path, earlier_run, make_data, overrides, error,
                                                          message):
    cfg = tiny_run_config(tmp_path, *overrides, data=make_data(tmp_path))
    with pytest.raises(error, match=message):
        run_training(cfg, overwrite=True, show_progress=False)
    assert tree_bytes(tmp_path / "run") == earlier_run


def test_a_target_matching_nothing_fails_clearly_and_keeps_the_earlier_run(tmp_path, earlier_run):
    cfg = tiny_run_config(tmp_path, "adapter.target_modules=[qq_proj]")
    with pytest.raises(ValueError, match=r"target_modules=\['qq_proj'\] matched no module.*q_proj"):
        run_training(cfg, overwrite=True, show_progress=False)
    assert tree_bytes(tmp_path / "run") == earlier_run


def test_an_output_dir_holding_a_run_is_refused_without_overwrite(tmp_path, earlier_run):
    with pytest.raises(RunError, match=r"already holds a run \(.*\); pass --overwrite .*resume_from_checkpoint=latest"):
        run_training(tiny_run_config(tmp_path, "train.max_steps=1"), show_progress=False)
    assert tree_bytes(tmp_path / "run") == earlier_run


def test_overwrite_replaces_the_earlier_run_also_for_a_relative_output_dir(tmp_path, earlier_run, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tiny_run_config(tmp_path, "train.max_steps=1", "output_dir=run")
    run_training(cfg, overwrite=True, show_progress=False)
    files = tree_bytes(tmp_path / "run")
    assert not any(name.startswith("checkpoint-") for name in files)  # the earlier run's checkpoints are gone
    assert json.loads(files["train_results.json"])["steps"] == 1
    assert [json.loads(line)["step"] for line in files["metrics.jsonl"].splitlines()] == [1]


def test_an_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "taken").write_text("not a directory")
    with pytest.raises(RunError, match="is a file; choose a directory"):
        run_training(tiny_run_config(tmp_path, output="taken"), show_progress=False)


RESUME_MISMATCH = {
    "another adapter rank": (("adapter.r=8",), r"adapter\.r is 4 in the checkpoint and 8 now"),
    "another target set": (("adapter.target_modules=[q_proj]",),
                           r"adapter\.target_modules is \"all-linear\" in the checkpoint and \[\"q_proj\"\] now"),
    "another batch size": (("train.batch_size=2",),
                           r"global batch: 4 in the checkpoint, 2 now \(train\.batch_size is 4 in the checkpoint and 2"),
    "another finetuning type": (("finetuning_type=full", "adapter=null"),
                                r"finetuning_type is \"adapter\" in the checkpoint and \"full\" now"),
    "another seed": (("train.seed=7",), r"train\.seed is 42 in the checkpoint and 7 now"),
    "another cutoff_len": (("data.cutoff_len=31",), r"data: the training examples differ from the checkpoint's "
                                                    r"\(data\.cutoff_len is 1024 in the checkpoint and 31 now"),
}


@pytest.mark.parametrize("overrides, message", RESUME_MISMATCH.values(), ids=RESUME_MISMATCH.keys())
def test_resuming_a_checkpoint_of_another_run_is_refused(tmp_path, earlier_run, overrides, message):
    cfg = tiny_run_config(tmp_path, "train.resume_from_checkpoint=latest", *overrides)
    with pytest.raises(RunError, match=rf"cannot resume .*checkpoint-2: it was made by a different run \(.*{message}"):
        run_training(cfg, show_progress=False)
    assert tree_bytes(tmp_path / "run") == earlier_run


def test_resuming_onto_another_model_is_refused(tmp_path, earlier_run):
    other = save_tiny_llama(tmp_path / "other-model", seed=1)  # same architecture and shapes, other weights
    cfg = tiny_run_config(tmp_path, "train.resume_from_checkpoint=latest", model=other)
    with pytest.raises(RunError, match=r"model: the checkpoint was trained on '.*model' and this run loads "
                                       r"'.*other-model', whose weights differ"):
        run_training(cfg, show_progress=False)
    assert tree_bytes(tmp_path / "run") == earlier_run


def test_resuming_with_other_data_of_the_same_size_is_refused(tmp_path, earlier_run):
    rows = format_rows("alpaca", 24)
    rows[5] = {**rows[5], "output": "a different answer"}
    write_rows(tmp_path / "train.json", rows)  # the same path, the same number of records
    cfg = tiny_run_config(tmp_path, "train.resume_from_checkpoint=latest")
    with pytest.raises(RunError, match=r"data: the training examples differ from the checkpoint's \(same data "
                                       r"settings, so the content of '.*train\.json' or the tokenizer changed\)"):
        run_training(cfg, show_progress=False)


def test_resume_latest_without_a_checkpoint_says_so(tmp_path):
    run_training(tiny_run_config(tmp_path, "train.max_steps=1"), show_progress=False)  # no save_steps
    with pytest.raises(FileNotFoundError, match=r"resume_from_checkpoint=latest, but .*run' holds no complete "
                                                r"checkpoint.*--overwrite"):
        run_training(tiny_run_config(tmp_path, "train.resume_from_checkpoint=latest"), show_progress=False)


def test_resume_from_a_path_that_is_not_a_checkpoint_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"is not a checkpoint directory \(no trainer_state.json\)"):
        run_training(tiny_run_config(tmp_path, f"train.resume_from_checkpoint={tmp_path}"), show_progress=False)


def test_resume_into_a_new_output_dir(tmp_path, earlier_run):
    checkpoint = tmp_path / "run" / "checkpoint-1"
    cfg = tiny_run_config(tmp_path, "train.max_steps=2", f"train.resume_from_checkpoint={checkpoint}", output="new")
    result = run_training(cfg, show_progress=False)
    assert result.steps == 2
    assert os.path.isfile(tmp_path / "new" / "adapter" / "adapter_model.safetensors")
    assert tree_bytes(tmp_path / "run") == earlier_run
