"""`lorakit train`: a YAML run config with overrides, end to end on a tiny model; refusals and Ctrl-C."""

from __future__ import annotations

import contextlib
import io
import json
import signal
from types import SimpleNamespace

import pytest

from lorakit.cli.main import main
from tests.integration.cli_support import ALPACA_ROWS, make_model_dir, run_cli, write_jsonl

RUN_YAML = """\
model: {model}
adapter: {{method: lora, r: 4, lora_alpha: 8, target_modules: all-linear}}
data: {{path: {data}, val_size: 3, cutoff_len: 64}}
train: {{learning_rate: 1.0e-3, max_steps: 10, batch_size: 4, logging_steps: 1}}
eval: {{max_new_tokens: 4}}
output_dir: {out}
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_train")
    model = make_model_dir(root / "model")
    data = write_jsonl(root / "train.jsonl", ALPACA_ROWS)
    config = root / "run.yaml"
    config.write_text(RUN_YAML.format(model=model, data=data, out=root / "unused"), encoding="utf-8")
    return root, config


@pytest.fixture(scope="module")
def trained_run(workspace):
    """One run of `lorakit train run.yaml train.max_steps=3 output_dir=...` shared by the tests below:
    (output_dir, exit code, what it printed)."""
    root, config = workspace
    out = root / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["train", str(config), "train.max_steps=3", f"output_dir={out}", "--no-progress"])
    return out, code, printed.getvalue()


def test_train_end_to_end_with_overrides(trained_run):
    out, code, _ = trained_run
    assert code == 0
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "metrics.jsonl",
                 "loss_curve.png", "train_results.json", "run_config.yaml"):
        assert (out / name).is_file(), name
    results = json.loads((out / "train_results.json").read_text())
    assert results["steps"] == 3  # the override beat the YAML's max_steps: 10
    assert json.loads((out / "adapter/adapter_config.json").read_text())["r"] == 4
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3]
    assert "eval_loss" in logged[-1] and "eval_rouge1" in logged[-1]


def test_train_prints_a_summary(trained_run):
    out, _, stdout = trained_run
    results = json.loads((out / "train_results.json").read_text())
    assert "done: 3 steps in" in stdout
    assert f"final train loss {results['train_loss']:.4f}" in stdout
    assert f"validation: loss {results['eval']['loss']:.4f}" in stdout and "rouge1" in stdout
    assert f"adapter saved to {out / 'adapter'}" in stdout
    assert f"trainable params: {results['trainable_params']:,d} of {results['total_params']:,d}" in stdout


def test_existing_run_is_refused_without_overwrite(trained_run, workspace, capsys):
    out, _, _ = trained_run
    _, config = workspace
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, stdout, stderr = run_cli(capsys, "train", config, "train.max_steps=1", f"output_dir={out}")
    assert code == 1
    assert stderr.startswith("lorakit: error: output_dir") and "--overwrite" in stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing touched


def test_overwrite_replaces_the_run(workspace, capsys, tmp_path):
    _, config = workspace
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 99, "loss": 1.0}\n')  # an earlier run's record
    code, _, stderr = run_cli(capsys, "train", config, "train.max_steps=2", f"output_dir={out}", "--overwrite",
                              "--no-progress")
    assert code == 0, stderr
    assert json.loads((out / "train_results.json").read_text())["steps"] == 2
    assert '"step": 99' not in (out / "metrics.jsonl").read_text()


@pytest.mark.parametrize("where", ["yaml", "override"])
def test_unknown_key_suggests_the_right_one(workspace, capsys, tmp_path, where):
    root, config = workspace
    out = tmp_path / "run"
    if where == "yaml":
        bad = tmp_path / "bad.yaml"
        bad.write_text(config.read_text().replace("learning_rate:", "learnig_rate:"), encoding="utf-8")
        args = ["train", bad, f"output_dir={out}"]
    else:
        args = ["train", config, "train.learnig_rate=1e-4", f"output_dir={out}"]
    code, _, stderr = run_cli(capsys, *args)
    assert code == 1
    assert stderr.startswith("lorakit: error: ")
    assert "unknown key 'learnig_rate' (did you mean 'learning_rate'?)" in stderr
    assert not out.exists()


def test_bad_inputs_are_one_line_errors(workspace, capsys, tmp_path):
    _, config = workspace
    cases = [
        (["train", tmp_path / "missing.yaml"], "config file"),
        (["train", config, "train.max_steps"], "must look like key=value"),
        (["train", config, "train.batch_size=0", f"output_dir={tmp_path / 'a'}"], "batch_size"),
        (["train", config, f"model={tmp_path / 'no-model'}", f"output_dir={tmp_path / 'b'}"], "does not exist"),
        (["train", config, f"data.path={tmp_path / 'no-data.jsonl'}", f"output_dir={tmp_path / 'c'}"],
         "not found"),
    ]
    for args, expected in cases:
        code, _, stderr = run_cli(capsys, *args)
        assert code == 1, args
        assert stderr.startswith("lorakit: error: ") and expected in stderr, stderr
        assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr


def test_ctrl_c_saves_a_checkpoint_and_exits_130(workspace, capsys, tmp_path, monkeypatch):
    """The trainer's Ctrl-C handler (first SIGINT: finish the step, checkpoint, stop) seen from the CLI."""
    import lorakit.train.loop as loop

    _, config = workspace
    real_step, calls = loop._train_step, []

    def step_then_ctrl_c(*args, **kwargs):
        calls.append(1)
        result = real_step(*args, **kwargs)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)
        return result

    monkeypatch.setattr(loop, "_train_step", step_then_ctrl_c)
    out = tmp_path / "run"
    code, stdout, _ = run_cli(capsys, "train", config, f"output_dir={out}", "--no-progress")
    assert code == 130
    assert len(calls) == 2 and (out / "checkpoint-2").is_dir()
    assert not (out / "train_results.json").exists()
    assert "interrupted after 2 steps" in stdout and "train.resume_from_checkpoint=latest" in stdout


def test_only_rank_0_prints(workspace, capsys, tmp_path, monkeypatch):
    """Under torchrun (RANK set) the other ranks print nothing but their errors, prefixed by the rank.
    The real 2-process launch of `-m lorakit train` is tested in test_distributed.py."""
    import lorakit.train.loop as loop

    _, config = workspace
    finished = SimpleNamespace(interrupted=False, steps=1)
    monkeypatch.setattr(loop, "run_training", lambda cfg, overwrite=False, show_progress=True, return_model=True: finished)
    monkeypatch.setenv("RANK", "1")
    code, stdout, stderr = run_cli(capsys, "train", config, f"output_dir={tmp_path / 'run'}")
    assert (code, stdout, stderr) == (0, "", "")
    code, stdout, stderr = run_cli(capsys, "train", config, "train.batch_size=0")
    assert code == 1 and stdout == ""
    assert stderr.startswith("[rank 1] lorakit: error: ") and "batch_size" in stderr
