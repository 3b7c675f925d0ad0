"""`--help` of every command, usage errors, exit codes and stderr, in-process and through `python -m lorakit`."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

from lorakit.cli import main as cli_main
from tests.integration.cli_support import run_cli

# (command, an option its help must describe)
COMMAND_OPTIONS = [("train", "--overwrite"), ("eval", "--adapter"), ("generate", "--prompts-file"),
                   ("chat", "--system"), ("merge", "--output"), ("inspect", "--target-modules")]


@pytest.mark.parametrize("command, option", COMMAND_OPTIONS)
def test_every_command_has_help(capsys, command, option):
    code, out, err = run_cli(capsys, command, "--help")
    assert code == 0, err
    assert out.startswith(f"usage: lorakit {command}")
    assert option in out
    module = importlib.import_module(cli_main.COMMANDS_BY_NAME[command].module)
    assert module.__doc__.splitlines()[0] in out  # the module docstring is the description


def test_top_level_help_lists_every_command(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    for command in cli_main.COMMANDS:
        assert command.name in out
    assert "demo" in out


def test_demo_is_in_the_command_table_and_imported_lazily():
    demo = cli_main.COMMANDS_BY_NAME["demo"]
    assert demo.module == "lorakit.cli.demo"


def test_missing_command_module_is_a_clean_error(capsys, monkeypatch):
    ghost = cli_main.Command("ghost", "lorakit.cli.no_such_command", "not installed")
    monkeypatch.setitem(cli_main.COMMANDS_BY_NAME, "ghost", ghost)
    code, _, err = run_cli(capsys, "ghost")
    assert code == 1
    assert err.strip() == ("lorakit: error: the 'ghost' command is not available in this installation "
                           "(lorakit.cli.no_such_command is missing)")


def test_no_command_and_unknown_command_are_usage_errors(capsys):
    code, _, err = run_cli(capsys)
    assert code == 2 and "usage: lorakit" in err
    code, _, err = run_cli(capsys, "trian")
    assert code == 2
    assert err.startswith("lorakit: error: argument <command>: invalid choice: 'trian'")
    assert len(err.strip().splitlines()) == 1


def test_bad_option_value_is_one_line_usage_error(capsys):
    code, _, err = run_cli(capsys, "eval", "--data", "x.jsonl", "--batch-size", "many")
    assert code == 2
    assert err.startswith("lorakit: error: argument --batch-size: invalid int value: 'many'")
    assert len(err.strip().splitlines()) == 1


def test_debug_shows_the_traceback(capsys, tmp_path):
    code, _, err = run_cli(capsys, "--debug", "train", tmp_path / "missing.yaml")
    assert code == 1
    assert "Traceback" in err and "lorakit: error: config file" in err


def _python_m_lorakit(*args, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "lorakit", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def test_python_m_lorakit_help(tmp_path):
    done = _python_m_lorakit("--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "train" in done.stdout and "merge" in done.stdout


def test_python_m_lorakit_bad_input_exit_code_and_stderr(tmp_path):
    done = _python_m_lorakit("train", str(tmp_path / "missing.yaml"), cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip() == f"lorakit: error: config file {str(tmp_path / 'missing.yaml')!r} not found"
    assert done.stdout == ""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the malloc swap uses LD_PRELOAD (Linux)")
def test_train_reexecutes_on_the_preferred_malloc(tmp_path):
    """`lorakit train` re-executes itself once with tcmalloc preloaded when it is installed
    (train/runtime.py) and names the malloc it trains on; LORAKIT_ALLOCATOR=system keeps glibc's."""
    from tests.integration.cli_support import ALPACA_ROWS, make_model_dir, preferred_malloc, write_jsonl

    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {make_model_dir(tmp_path / 'model')}\n"
        "adapter: {method: lora, r: 4, lora_alpha: 8, target_modules: all-linear}\n"
        f"data: {{path: {write_jsonl(tmp_path / 'train.jsonl', ALPACA_ROWS)}, val_size: 0, cutoff_len: 32}}\n"
        "train: {max_steps: 1, batch_size: 2}\n", encoding="utf-8")
    clean, expected = preferred_malloc()
    for choice, malloc in (("auto", expected), ("system", "glibc")):
        env = {**clean, "PYTHONWARNINGS": "ignore", "LORAKIT_ALLOCATOR": choice}
        done = subprocess.run([sys.executable, "-m", "lorakit", "train", str(config), f"output_dir={tmp_path / choice}",
                               "--no-progress"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        assert f"(malloc: {malloc})" in done.stdout, done.stdout

    env = {**clean, "LORAKIT_ALLOCATOR": str(tmp_path / "libmissing.so")}
    done = subprocess.run([sys.executable, "-m", "lorakit", "train", str(config)], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"lorakit: error: LORAKIT_ALLOCATOR={tmp_path / 'libmissing.so'}: no such file")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the malloc swap uses LD_PRELOAD (Linux)")
def test_generation_commands_reexecute_with_their_arguments_and_stdin(tmp_path):
    """`lorakit generate` and `lorakit chat` re-execute on the preferred malloc like training (cli/startup.py): the
    new process keeps the arguments and the unread stdin, and a bad LORAKIT_ALLOCATOR stops it with one line."""
    from tests.integration.cli_support import make_model_dir, preferred_malloc

    model = str(make_model_dir(tmp_path / "model"))
    clean, _ = preferred_malloc()
    env = {**clean, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", "lorakit", "generate", "--model", model, "--raw", "--prompt", "a b",
                           "--max-new-tokens", "2", "--output", str(tmp_path / "answers.jsonl")],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert len((tmp_path / "answers.jsonl").read_text(encoding="utf-8").splitlines()) == 1
    done = subprocess.run([sys.executable, "-m", "lorakit", "chat", "--model", model, "--max-new-tokens", "2"],
                          input="hello\n/exit\n", capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("assistant>") == 1  # the piped message was read after the re-execution
    env["LORAKIT_ALLOCATOR"] = str(tmp_path / "libmissing.so")
    done = subprocess.run([sys.executable, "-m", "lorakit", "generate", "--model", model, "--prompt", "a"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("lorakit: error: LORAKIT_ALLOCATOR=") and len(done.stderr.strip().splitlines()) == 1
