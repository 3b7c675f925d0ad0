"""A user's workspace for the reliability catalogue: a tiny model, data files good and bad, finished runs,
adapters good and broken, run configs. Every bad input of test_catalogue.py points into it, and every test
checks that it is byte for byte the same afterwards (`snapshot`).

    ws = build_workspace(tmp_path)      # once per module: a few seconds
    before = snapshot(ws.root)
    ...run a command...
    assert snapshot(ws.root) == before
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lorakit.train.loop import run_training
from tests.train_fixtures import format_rows, save_tiny_classifier, save_tiny_llama, tiny_run_config, write_rows

RUN_YAML = """\
model: {model}
adapter: {{method: lora, r: 4, lora_alpha: 8, target_modules: all-linear}}
data: {{path: {data}}}
train: {{learning_rate: 1.0e-2, max_steps: 2, batch_size: 4, logging_steps: 1, save_steps: 1}}
eval: {{generate: false}}
output_dir: {out}
"""


@dataclass
class Workspace:
    root: Path
    model: Path  # tiny Llama + ChatML tokenizer
    data: Path  # good alpaca data (24 records), what `run` was trained on
    config: Path  # run.yaml: model + data, output_dir = root/unused
    run: Path  # a finished run with checkpoints (trained on `data` with `config`'s settings)
    adapter: Path  # run/adapter
    classifier: Path  # tiny BERT classifier model
    cls_data: Path  # text_label data, classes negative / neutral / positive
    cls_run: Path  # a finished SEQ_CLS run on the classifier: cls_run/adapter has labels.json

    def path(self, name: str) -> Path:
        return self.root / name


def build_workspace(root: Path) -> Workspace:
    root = Path(root)
    model = Path(save_tiny_llama(root / "model"))
    data = Path(write_rows(root / "train.json", format_rows("alpaca", 24)))
    config = root / "run.yaml"
    config.write_text(RUN_YAML.format(model=model, data=data, out=root / "unused"), encoding="utf-8")
    run = root / "run"
    run_training(tiny_run_config(root, "train.max_steps=2", "train.save_steps=1", model=model, data=data),
                 show_progress=False)
    classifier = Path(save_tiny_classifier(root / "bert"))
    cls_data = Path(write_rows(root / "labels.jsonl", format_rows("text_label", 24)))
    run_training(tiny_run_config(root, "task_type=SEQ_CLS", "adapter.target_modules=[query, value]",
                                 model=classifier, data=cls_data, output="cls-run"), show_progress=False)
    ws = Workspace(root, model, data, config, run, run / "adapter", classifier, cls_data, root / "cls-run")
    _bad_files(ws)
    return ws


def _bad_files(ws: Workspace) -> None:
    root = ws.root
    good = format_rows("alpaca", 6)
    (root / "not-yaml.yaml").write_text("model: [unclosed\n", encoding="utf-8")
    (root / "list.yaml").write_text("- model\n- data\n", encoding="utf-8")
    (root / "latin1.yaml").write_bytes(ws.config.read_bytes().replace(b"output_dir", "# r\xe9sum\xe9\noutput_dir"
                                                                      .encode("latin-1"), 1))
    (root / "utf16.yaml").write_bytes(codecs.BOM_UTF16_LE + ws.config.read_text().encode("utf-16-le"))
    (root / "data.txt").write_text("instruction,output\n", encoding="utf-8")
    lines = [json.dumps(r) for r in good]
    (root / "broken.jsonl").write_text("\n".join([lines[0], lines[1][:-5], *lines[2:]]) + "\n", encoding="utf-8")
    (root / "latin1.jsonl").write_bytes(("\n".join(lines[:2]) + "\n").encode() + '{"instruction": "caf\xe9", '
                                        '"output": "x"}\n'.encode("latin-1"))
    (root / "utf16.csv").write_bytes(codecs.BOM_UTF16_LE + "instruction,output\nhi,there\n".encode("utf-16-le"))
    (root / "not-objects.json").write_text(json.dumps([good[0], "oops"]), encoding="utf-8")
    write_rows(root / "no-output.jsonl", [{"instruction": "x", "input": ""}, *good])
    write_rows(root / "null-output.jsonl", [good[0], {"instruction": "x", "output": None}])
    write_rows(root / "number-output.jsonl", [{"instruction": "x", "output": 3}])
    write_rows(root / "qa.json", [{"question": "q", "answer": "a"}])
    write_rows(root / "empty.json", [])
    write_rows(root / "robot.jsonl", [{"messages": [{"role": "robot", "content": "x"}]}])
    write_rows(root / "assistant-first.jsonl", [{"messages": [{"role": "assistant", "content": "x"}]}])
    write_rows(root / "mixed-labels.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": "pos"}])
    write_rows(root / "negative-label.jsonl", [{"text": "a", "label": -1}])
    write_rows(root / "unknown-label.jsonl", [{"text": "a", "label": "furious"}])
    write_rows(root / "renamed-labels.jsonl", [{"text": "a", "label": "good"}, {"text": "b", "label": "bad"}])
    (root / "extra-cells.csv").write_text("instruction,output\nhi,there,again\n", encoding="utf-8")
    other = format_rows("alpaca", 24)
    other[5] = {**other[5], "output": "changed"}
    write_rows(root / "train-changed.json", other)  # same size as `data`, other content
    (root / "a-file").write_text("not a directory", encoding="utf-8")
    (root / "prompts-latin1.txt").write_bytes("hello\ncaf\xe9\n".encode("latin-1"))
    (root / "prompts-empty.txt").write_text("\n\n", encoding="utf-8")
    # a run killed before its first checkpoint: only what a run writes at its start
    (root / "early-kill").mkdir()
    shutil.copy(ws.run / "run_config.yaml", root / "early-kill" / "run_config.yaml")
    (root / "early-kill" / "metrics.jsonl").write_text('{"step": 1, "loss": 5.5}\n', encoding="utf-8")
    _broken_adapters(ws)


def _broken_adapters(ws: Workspace) -> None:
    root, adapter = ws.root, ws.adapter
    weights = load_file(adapter / "adapter_model.safetensors")
    nan = root / "nan-adapter"
    shutil.copytree(adapter, nan)
    poisoned = {k: v.clone() for k, v in weights.items()}
    name = sorted(k for k in poisoned if "lora_B" in k)[0]
    poisoned[name][0, 0] = float("nan")
    save_file(poisoned, nan / "adapter_model.safetensors")
    pickle_only = root / "bin-adapter"
    pickle_only.mkdir()
    shutil.copy(adapter / "adapter_config.json", pickle_only / "adapter_config.json")
    torch.save(weights, pickle_only / "adapter_model.bin")
    corrupt_model = root / "corrupt-model"  # a weights file cut short, as by an interrupted download
    shutil.copytree(ws.model, corrupt_model)
    (corrupt_model / "model.safetensors").write_bytes((ws.model / "model.safetensors").read_bytes()[:1000])
    corrupt = root / "corrupt-adapter"
    shutil.copytree(adapter, corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    bad_json = root / "bad-json-adapter"
    shutil.copytree(adapter, bad_json)
    (bad_json / "adapter_config.json").write_text("{not json", encoding="utf-8")
    # unknown keys (a newer PEFT's) only warn, as in PEFT; a PEFT option lorakit lacks, switched on, is refused
    unimplemented = root / "unimplemented-option-adapter"
    shutil.copytree(adapter, unimplemented)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (unimplemented / "adapter_config.json").write_text(json.dumps({**config, "lora_bias": True}), encoding="utf-8")
    other_base = save_tiny_llama(root / "wide-model", hidden_size=64, intermediate_size=128)
    wrong_base = root / "wide-adapter"
    shutil.copytree(adapter, wrong_base)
    (wrong_base / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": other_base}),
                                                    encoding="utf-8")
    no_labels = root / "cls-adapter-no-labels"
    shutil.copytree(ws.cls_run / "adapter", no_labels)
    os.remove(no_labels / "labels.json")


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root: a content hash for files, "dir" for directories (so new empty ones show)."""
    found = {}
    for path in sorted(Path(root).rglob("*")):
        relative = str(path.relative_to(root))
        found[relative] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return found
