"""A catalogue of bad inputs across config, data, model, adapter files and the command line. Each case runs a
`lorakit` command (in this process) and checks the three promises: the exit code, one line on stderr that names
the problem (no traceback), and nothing the user had is lost or changed (a hash of every file in the
workspace, before and after; a refused run leaves no directory behind either).

Faults (kill -9, concurrent runs, disk full, Ctrl-C at start-up) are in test_faults.py.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable

import pytest

from lorakit.cli.main import main
from lorakit.dir_lock import DirectoryLock
from tests.reliability.workspace import Workspace, build_workspace, snapshot


@dataclass(frozen=True)
class Case:
    args: Callable[[Workspace], list]  # the command line after `lorakit`
    code: int  # expected exit code
    message: str  # a regex the one-line error must match


def train(ws, *extra, out=None):
    return ["train", ws.config, f"output_dir={out or ws.path('new-run')}", "--no-progress", *extra]


def train_with_data(ws, name, *extra):
    return train(ws, f"data.path={ws.path(name)}", *extra)


CONFIG = {
    "config file missing": Case(lambda ws: ["train", ws.path("nope.yaml")], 1, r"config file '.*nope\.yaml' not found"),
    "config not YAML": Case(lambda ws: ["train", ws.path("not-yaml.yaml")], 1, r"not-yaml\.yaml is not valid YAML"),
    "config a list": Case(lambda ws: ["train", ws.path("list.yaml")], 1, r"must hold a mapping of settings"),
    "config not UTF-8": Case(lambda ws: ["train", ws.path("latin1.yaml")], 1,
                             r"latin1\.yaml, line 6, column 4: byte 0xe9 is not valid UTF-8 .*run configs.*"
                             r"Windows-1252.*iconv -f CP1252 -t UTF-8"),
    "config UTF-16": Case(lambda ws: ["train", ws.path("utf16.yaml")], 1,
                          r"utf16\.yaml is UTF-16LE text \(it starts with a UTF-16LE byte-order mark\)"),
    "unknown key": Case(lambda ws: train(ws, "train.learnig_rate=1e-4"), 1,
                        r"unknown key 'learnig_rate' \(did you mean 'learning_rate'\?\)"),
    "override without =": Case(lambda ws: train(ws, "train.max_steps"), 1,
                               r"override 'train\.max_steps' must look like key=value"),
    "override not YAML": Case(lambda ws: train(ws, "adapter.target_modules=[q_proj"), 1,
                              r"override 'adapter\.target_modules=\[q_proj': the value '\[q_proj' is not valid YAML"),
    "override into a value": Case(lambda ws: train(ws, "train.learning_rate.x=1"), 1,
                                  r"'learning_rate' is not a section"),
    "batch_size 0": Case(lambda ws: train(ws, "train.batch_size=0"), 1, r"train\.batch_size must be a positive int"),
    "negative learning rate": Case(lambda ws: train(ws, "train.learning_rate=-1"), 1,
                                   r"train\.learning_rate must be a positive number, got -1"),
    "unknown scheduler": Case(lambda ws: train(ws, "train.lr_scheduler=wavy"), 1,
                              r"train\.lr_scheduler must be one of 'cosine', 'linear', 'constant'; got 'wavy'"),
    "unknown finetuning type": Case(lambda ws: train(ws, "finetuning_type=qlora"), 1,
                                    r"finetuning_type must be one of 'adapter', 'lora', 'full', 'freeze'; got 'qlora'"),
    "unknown adapter method": Case(lambda ws: train(ws, "adapter.method=loha"), 1, r"Unknown adapter method 'loha'"),
    "adapter rank 0": Case(lambda ws: train(ws, "adapter.r=0"), 1, r"\br\b.*0"),
    "null data path": Case(lambda ws: train(ws, "data.path=null"), 1, r"data\.path is null; give the training data"),
    "val_size 1.5": Case(lambda ws: train(ws, "data.val_size=1.5"), 1, r"val_size=1\.5: a fraction must be in"),
    "eval max_new_tokens 0": Case(lambda ws: train(ws, "eval.max_new_tokens=0"), 1, r"eval\.max_new_tokens"),
    "fsdp without lora": Case(lambda ws: train(ws, "train.distributed=fsdp", "finetuning_type=full"), 1,
                              r"distributed=fsdp shards a frozen base model"),
}

OUTPUT_DIR = {
    "output_dir is a file": Case(lambda ws: train(ws, out=ws.path("a-file")), 1, r"output_dir '.*a-file' is a file"),
    "output_dir holds a run": Case(lambda ws: train(ws, out=ws.run), 1,
                                   r"output_dir '.*run' already holds a run \(.*\); pass --overwrite to replace it, "
                                   r"train\.resume_from_checkpoint=latest to continue it"),
    "run killed before its first checkpoint": Case(
        lambda ws: train(ws, out=ws.path("early-kill")), 1,
        r"holds a run that stopped before its first checkpoint \(.*\), so there is nothing to resume; pass "
        r"--overwrite to start it again"),
    "resume a run without checkpoints": Case(
        lambda ws: train(ws, "train.resume_from_checkpoint=latest", out=ws.path("early-kill")), 1,
        r"holds no complete checkpoint: the run there stopped before its first one.*--overwrite"),
    "resume a run that does not exist": Case(
        lambda ws: train(ws, "train.resume_from_checkpoint=latest", out=ws.path("no-such-run")), 1,
        r"'.*no-such-run' holds no run to resume; check output_dir"),
    "resume from a non-checkpoint": Case(lambda ws: train(ws, f"train.resume_from_checkpoint={ws.model}"), 1,
                                         r"is not a checkpoint directory \(no trainer_state\.json\)"),
    "resume with another rank": Case(lambda ws: train(ws, "train.resume_from_checkpoint=latest", "adapter.r=8",
                                                      out=ws.run), 1,
                                     r"cannot resume .*checkpoint-2: .*adapter\.r is 4 in the checkpoint and 8 now"),
    "resume with changed data": Case(
        lambda ws: train(ws, "train.resume_from_checkpoint=latest", f"data.path={ws.path('train-changed.json')}",
                         out=ws.run), 1,
        r"data: the training examples differ from the checkpoint's \(data\.path is \".*train\.json\" in the "
        r"checkpoint and \".*train-changed\.json\" now\)"),
    "resume with another model": Case(
        lambda ws: train(ws, "train.resume_from_checkpoint=latest", f"model={ws.path('wide-model')}", out=ws.run), 1,
        r"cannot resume .*model: the checkpoint was trained on '.*model' and this run loads '.*wide-model'"),
    "resume past max_steps": Case(lambda ws: train(ws, "train.resume_from_checkpoint=latest", "train.max_steps=1",
                                                   out=ws.run), 1,
                                  r"it is at step 2, past the end of this run \(1 steps"),
    "resume with another seed": Case(lambda ws: train(ws, "train.resume_from_checkpoint=latest", "train.seed=1",
                                                      out=ws.run), 1, r"train\.seed is 42 in the checkpoint and 1 now"),
}

DATA = {
    "data file missing": Case(lambda ws: train_with_data(ws, "nope.jsonl"), 1, r"Data file not found: '.*nope\.jsonl'"),
    "unknown file type": Case(lambda ws: train_with_data(ws, "data.txt"), 1, r"unknown file type '\.txt'"),
    "broken JSON line": Case(lambda ws: train_with_data(ws, "broken.jsonl"), 1,
                             r"broken\.jsonl, line 2: not valid JSON"),
    "data not UTF-8": Case(lambda ws: train_with_data(ws, "latin1.jsonl"), 1,
                           r"latin1\.jsonl, line 3, column 21: byte 0xe9 is not valid UTF-8 \(lorakit reads data "
                           r"files as UTF-8\); it looks like Windows-1252"),
    "data UTF-16": Case(lambda ws: train_with_data(ws, "utf16.csv"), 1, r"utf16\.csv is UTF-16LE text"),
    "record not an object": Case(lambda ws: train_with_data(ws, "not-objects.json"), 1,
                                 r"record 1 is a str, not an object"),
    "missing field": Case(lambda ws: train_with_data(ws, "no-output.jsonl", "data.format=alpaca"), 1,
                          r"no-output\.jsonl, line 1 \(record 0\): missing required field 'output'"),
    "null field": Case(lambda ws: train_with_data(ws, "null-output.jsonl"), 1,
                       r"line 2 \(record 1\): field 'output' is null; give it a value"),
    "number field": Case(lambda ws: train_with_data(ws, "number-output.jsonl"), 1,
                         r"field 'output' must be a string, got int"),
    "undetectable format": Case(lambda ws: train_with_data(ws, "qa.json"), 1,
                                r"Cannot detect the data format.*\['answer', 'question'\]"),
    "no records": Case(lambda ws: train_with_data(ws, "empty.json"), 1, r"has no records"),
    "every label masked": Case(lambda ws: train(ws, "data.cutoff_len=8"), 1,
                               r"every label is masked in all 24 examples: cutoff_len=8"),
    "val_size takes everything": Case(lambda ws: train(ws, "data.val_size=24"), 1,
                                      r"val_size=24 takes 24 of the 24 training records"),
    "unknown role": Case(lambda ws: train_with_data(ws, "robot.jsonl"), 1, r"message role 'robot' is not one of"),
    "assistant first": Case(lambda ws: train_with_data(ws, "assistant-first.jsonl"), 1,
                            r"starts with an assistant turn"),
    "mixed label kinds": Case(lambda ws: train_with_data(ws, "mixed-labels.jsonl", "task_type=SEQ_CLS"), 1,
                              r"Labels mix integers and strings"),
    "negative class id": Case(lambda ws: train_with_data(ws, "negative-label.jsonl", "task_type=SEQ_CLS"), 1,
                              r"label -1 is negative"),
    "task type does not fit": Case(lambda ws: train(ws, f"data.path={ws.cls_data}"), 1,
                                   r"task_type CAUSAL_LM does not fit 'text_label' data"),
    "validation label unknown": Case(
        lambda ws: train(ws, f"data.path={ws.cls_data}", f"data.val_path={ws.path('unknown-label.jsonl')}",
                         "task_type=SEQ_CLS", f"model={ws.classifier}", "adapter.target_modules=[query]"), 1,
        r"unknown-label\.jsonl, line 1 \(record 0\): label 'furious' is not one of the classes of the training data"),
    "CSV row with extra cells": Case(lambda ws: train_with_data(ws, "extra-cells.csv"), 1,
                                     r"extra-cells\.csv line 2: 3 cells but the header has 2 columns"),
    "system prompt on text data": Case(lambda ws: train(ws, f"data.path={ws.cls_data}", "data.format=text",
                                                        "data.text_field=text", "data.system_prompt=hi"), 1,
                                       r"system_prompt is set but the 'text' records are not conversations"),
}

MODEL = {
    "model missing": Case(lambda ws: train(ws, f"model={ws.path('no-model')}"), 1, r"does not exist"),
    "model is an adapter": Case(lambda ws: train(ws, f"model={ws.adapter}"), 1,
                                r"has no config\.json.*It holds an adapter"),
    "model is a file": Case(lambda ws: train(ws, f"model={ws.path('a-file')}"), 1, r"is a file; expected a model"),
    "model weights cut short": Case(lambda ws: train(ws, f"model={ws.path('corrupt-model')}"), 1,
                                    r"a weights file in .*corrupt-model is not a readable safetensors file .*fetch it "
                                    r"again"),
    "targets match nothing": Case(lambda ws: train(ws, "adapter.target_modules=[qq_proj]"), 1,
                                  r"target_modules=\['qq_proj'\] matched no module"),
    "freeze more layers than exist": Case(lambda ws: train(ws, "finetuning_type=freeze", "adapter=null",
                                                           "train.freeze_trainable_layers=9"), 1,
                                          r"freeze_trainable_layers=9 but the model has only 2 blocks"),
}


def generate(ws, adapter, *extra):
    return ["generate", "--adapter", adapter, "--prompt", "hi", "--max-new-tokens", "2", *extra]


ADAPTER = {
    "adapter missing": Case(lambda ws: generate(ws, ws.path("nowhere")), 1, r"adapter '.*nowhere' does not exist"),
    "adapter is a model": Case(lambda ws: generate(ws, ws.model), 1, r"holds no adapter_config\.json"),
    "NaN adapter, generate": Case(lambda ws: generate(ws, ws.path("nan-adapter")), 1,
                                  r"the adapter .*nan-adapter holds NaN/inf values in 1 of its \d+ tensors \(e\.g\. "
                                  r".*lora_B\.weight: 1 of \d+ values\).*use an earlier checkpoint"),
    "NaN adapter, eval": Case(lambda ws: ["eval", "--adapter", ws.path("nan-adapter"), "--data", ws.data,
                                          "--no-generate"], 1, r"holds NaN/inf values"),
    "NaN adapter, merge": Case(lambda ws: ["merge", "--adapter", ws.path("nan-adapter"), "--output",
                                           ws.path("merged-nan")], 1, r"holds NaN/inf values"),
    "pickle-only adapter": Case(lambda ws: generate(ws, ws.path("bin-adapter")), 1,
                                r"holds only adapter_model\.bin, a pickle file.*pass --allow-pickle.*or convert it "
                                r"once: python -c"),
    "corrupt weights": Case(lambda ws: generate(ws, ws.path("corrupt-adapter")), 1,
                            r"adapter_model\.safetensors is not a readable safetensors file"),
    "config not JSON": Case(lambda ws: generate(ws, ws.path("bad-json-adapter")), 1,
                            r"adapter_config\.json is not valid JSON"),
    "config with an unimplemented option": Case(lambda ws: generate(ws, ws.path("unimplemented-option-adapter")), 1,
                                                r"lora_bias=True: lorakit does not implement this PEFT option"),
    "adapter of another base": Case(lambda ws: generate(ws, ws.path("wide-adapter")), 1,
                                    r"cannot be loaded into|shape"),
    "classifier adapter for generate": Case(lambda ws: generate(ws, ws.cls_run), 1,
                                            r"is for SEQ_CLS, but generate \(a causal language model\) needs CAUSAL_LM"),
    "label the classifier never saw": Case(
        lambda ws: ["eval", "--adapter", ws.cls_run, "--data", ws.path("unknown-label.jsonl")], 1,
        r"1 of 1 records have a label that is not a class of the adapter .*cls-run/adapter \(.*unknown-label\.jsonl, "
        r"line 1 \(record 0\): 'furious'\); its classes are \['negative', 'neutral', 'positive'\]"),
    "renamed labels": Case(lambda ws: ["eval", "--adapter", ws.cls_run, "--data", ws.path("renamed-labels.jsonl")],
                           1, r"2 of 2 records have a label that is not a class of the adapter"),
    "no labels.json and other class names": Case(
        lambda ws: ["eval", "--adapter", ws.path("cls-adapter-no-labels"), "--data", ws.path("renamed-labels.jsonl")],
        1, r"does not record its class names \(no labels\.json.*the data has 2 classes \(bad, good\) for its 3 "
           r"outputs"),
}

COMMAND_LINE = {
    "merge onto its adapter": Case(lambda ws: ["merge", "--adapter", ws.adapter, "--output", ws.adapter,
                                               "--overwrite"], 1,
                                   r"--output '.*adapter' would replace the adapter it merges"),
    "merge onto the run holding the adapter": Case(lambda ws: ["merge", "--adapter", ws.run, "--output", ws.run,
                                                               "--overwrite"], 1,
                                                   r"--output '.*run' would replace the adapter it merges \(.*run"),
    "merge onto the base model": Case(lambda ws: ["merge", "--adapter", ws.adapter, "--model", ws.model, "--output",
                                                  ws.model, "--overwrite"], 1,
                                      r"would replace the base model it merges"),
    "merge onto an existing directory": Case(lambda ws: ["merge", "--adapter", ws.adapter, "--output", ws.cls_run],
                                             1, r"--output '.*cls-run' already exists and is not empty; pass "
                                                r"--overwrite"),
    "merge onto a file": Case(lambda ws: ["merge", "--adapter", ws.adapter, "--output", ws.path("a-file")], 1,
                              r"--output '.*a-file' is a file"),
    "inspect option not YAML": Case(lambda ws: ["inspect", "--model", ws.model, "--option", "target_modules=[q"], 1,
                                    r"--option 'target_modules=\[q': the value '\[q' is not valid YAML"),
    "inspect option without =": Case(lambda ws: ["inspect", "--model", ws.model, "--option", "use_rslora"], 1,
                                     r"--option 'use_rslora' must look like key=value"),
    "prompts file not UTF-8": Case(lambda ws: ["generate", "--model", ws.model, "--prompts-file",
                                               ws.path("prompts-latin1.txt")], 1,
                                   r"prompts-latin1\.txt, line 2, column 4: byte 0xe9 is not valid UTF-8"),
    "prompts file empty": Case(lambda ws: ["generate", "--model", ws.model, "--prompts-file",
                                           ws.path("prompts-empty.txt")], 1, r"holds no prompts"),
    "batch size 0": Case(lambda ws: generate(ws, ws.adapter, "--batch-size", "0"), 1,
                         r"--batch-size must be a positive integer"),
    "eval output is a directory": Case(lambda ws: ["eval", "--model", ws.model, "--data", ws.data, "--output",
                                                   ws.root], 1, r"--output '.*' is a directory; give a file name"),
    "data without config or files": Case(lambda ws: ["data"], 1, r"give a run config .* or both --data FILE and "
                                                                  r"--model M"),
    "unknown command": Case(lambda ws: ["trian", ws.config], 2, r"invalid choice: 'trian'"),
    "unknown option": Case(lambda ws: ["train", ws.config, "--overwrote"], 2, r"unrecognized arguments: --overwrote"),
}

CASES = {**CONFIG, **OUTPUT_DIR, **DATA, **MODEL, **ADAPTER, **COMMAND_LINE}


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    return build_workspace(tmp_path_factory.mktemp("workspace"))


def test_the_catalogue_is_wide():
    assert len(CASES) >= 60, len(CASES)
    assert min(len(CONFIG), len(DATA), len(MODEL), len(ADAPTER), len(COMMAND_LINE), len(OUTPUT_DIR)) >= 5


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bad_input_fails_clearly_and_loses_nothing(ws, capsys, case):
    before = snapshot(ws.root)
    capsys.readouterr()
    code = main([str(a) for a in case.args(ws)])
    out, err = capsys.readouterr()
    assert code == case.code, (code, out[-2000:], err[-2000:])
    error_lines = [line for line in err.splitlines() if "error:" in line]
    assert len(error_lines) == 1, err
    assert "Traceback" not in err and "Traceback" not in out
    assert re.search(case.message, error_lines[0]), error_lines[0]
    assert snapshot(ws.root) == before


def test_a_run_holding_the_output_dir_is_named(ws, capsys):
    """Two runs on one directory: the second is refused with the first one's pid (the lock is held here, as the
    first run holds it; a real second process is in test_faults.py)."""
    before = snapshot(ws.root)
    with DirectoryLock(str(ws.run / ".lorakit.lock"), "output_dir"):
        code = main([str(a) for a in train(ws, "--overwrite", out=ws.run)])
    err = capsys.readouterr().err
    assert code == 1
    assert f"is in use by another lorakit process: pid {os.getpid()} on " in err and "started 20" in err
    assert "wait for it to finish (or stop it), or choose another directory" in err
    assert snapshot(ws.root) == before


def test_the_advice_in_the_messages_works(ws, tmp_path, capsys):
    """--allow-pickle reads the pickle-only adapter; --overwrite restarts a run killed before its first checkpoint."""
    assert main(["generate", "--adapter", str(ws.path("bin-adapter")), "--allow-pickle", "--prompt", "hi",
                 "--max-new-tokens", "2"]) == 0
    early = tmp_path / "early-kill"
    early.mkdir()
    for name in ("run_config.yaml", "metrics.jsonl"):
        (early / name).write_bytes((ws.path("early-kill") / name).read_bytes())
    assert main([str(a) for a in train(ws, "--overwrite", out=early)]) == 0
    assert (early / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(os.listdir(early)) == ["adapter", "checkpoint-1", "checkpoint-2", "loss_curve.png", "metrics.jsonl",
                                         "run_config.yaml", "train_results.json"]
    capsys.readouterr()
