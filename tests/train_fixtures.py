"""Shared pieces of the trainer tests: tiny model directories, data files in every format, a RunConfig.

    model_dir = save_tiny_llama(tmp_path / "model")
    data = write_rows(tmp_path / "train.jsonl", format_rows("alpaca", 24))
    cfg = tiny_run_config(tmp_path, "train.max_steps=4", model=model_dir, data=data)
    result = run_training(cfg, show_progress=False)

`tiny_run_config` creates the model directory and an alpaca data file itself when none are given. Runs
are a few optimizer steps on a 2-layer, hidden-size-32 model: a fraction of a second each, provided torch
uses one thread (`one_torch_thread`, an autouse fixture to import into a test module): on a busy
2-core machine two spinning threads per matmul make these tiny runs ten times slower.
"""

from __future__ import annotations

import copy
import csv
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.train import precision
from lorakit.train.config import RunConfig, TrainArgs, load_run_config
from tests.tiny import tiny_bert_classifier, tiny_llama, tiny_tokenizer

LABELS = ("negative", "neutral", "positive")


@pytest.fixture(autouse=True)
def one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---- models --------------------------------------------------------------------------------------
def save_tiny_llama(directory: str | os.PathLike, **overrides) -> str:
    """A tiny Llama causal LM + byte-level ChatML tokenizer saved as a transformers model directory."""
    directory = str(directory)
    tiny_llama(**overrides).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def save_tiny_classifier(directory: str | os.PathLike, num_labels: int = len(LABELS)) -> str:
    """A tiny BERT sequence classifier + the byte-level tokenizer (no chat template)."""
    directory = str(directory)
    tiny_bert_classifier(num_labels=num_labels).save_pretrained(directory)
    tiny_tokenizer(chat_template=False).save_pretrained(directory)
    return directory


# ---- data ----------------------------------------------------------------------------------------
def format_rows(fmt: str, n: int = 24) -> list[dict]:
    """`n` small records of format `fmt`: a toy arithmetic task the tiny model can start to learn."""
    rows = []
    for i in range(n):
        question, answer = f"add {i % 7} and {i % 5}", str(i % 7 + i % 5)
        rows.append({
            "alpaca": {"instruction": question, "input": "", "output": answer},
            "messages": {"messages": [{"role": "user", "content": question},
                                      {"role": "assistant", "content": answer}]},
            "sharegpt": {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]},
            "prompt_completion": {"prompt": f"{question} = ", "completion": answer},
            "text": {"text": f"{question} makes {answer}."},
            "text_label": {"text": f"item {i} is {LABELS[i % 3]}", "label": LABELS[i % 3]},
        }[fmt])
    return rows


def write_rows(path: str | os.PathLike, rows: list[dict]) -> str:
    """Write rows as .json, .jsonl, .csv or .parquet (by suffix), or as a save_to_disk folder (no suffix)."""
    path = str(path)
    suffix = os.path.splitext(path)[1]
    if suffix == ".json":
        Path(path).write_text(json.dumps(rows), encoding="utf-8")
    elif suffix == ".jsonl":
        Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif suffix == ".csv":
        with open(path, "w", encoding="utf-8", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    elif suffix == "":
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(path)
    else:
        raise ValueError(f"write_rows: unknown suffix {suffix!r}")
    return path


# ---- run configs ---------------------------------------------------------------------------------
def base_run_dict(tmp_path, model=None, data=None, output: str = "run") -> dict:
    """The raw (YAML-shaped) settings of a tiny LoRA run; creates the model and data when not given."""
    tmp_path = Path(tmp_path)
    if model is None:
        model = tmp_path / "model"
        if not (model / "config.json").is_file():
            save_tiny_llama(model)
    if data is None:
        data = tmp_path / "train.json"
        if not data.is_file():
            write_rows(data, format_rows("alpaca", 24))
    return {
        "model": str(model),
        "output_dir": str(tmp_path / output),
        "data": {"path": str(data)},
        "adapter": {"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
        "train": {"learning_rate": 1e-2, "batch_size": 4, "max_steps": 4, "logging_steps": 1},
        "eval": {"generate": False, "max_new_tokens": 4, "max_samples": 2, "batch_size": 4},
    }


def tiny_run_config(tmp_path, *overrides: str, model=None, data=None, output: str = "run",
                    base: dict | None = None) -> RunConfig:
    """A RunConfig for a tiny run in tmp_path/<output>; `overrides` are CLI-style `key=value` strings."""
    raw = base_run_dict(tmp_path, model, data, output)
    for section, values in copy.deepcopy(base or {}).items():
        if isinstance(values, dict) and isinstance(raw.get(section), dict):
            raw[section].update(values)
        else:
            raw[section] = values
    return load_run_config(None, list(overrides), base=raw)


# ---- reading results -----------------------------------------------------------------------------
def checkpoint_weights(checkpoint_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The trainable tensors saved in a checkpoint."""
    return load_file(os.path.join(checkpoint_dir, "trainable.safetensors"))


def trained_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of a model's trainable parameters, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def metrics_records(output_dir: str | os.PathLike) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl"), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def train_losses(output_dir: str | os.PathLike) -> dict[int, float]:
    """step -> logged training loss (logging_steps=1 logs every step)."""
    return {r["step"]: r["loss"] for r in metrics_records(output_dir) if "loss" in r}


def default_run_is_bf16() -> bool:
    """Whether a run with the default train.bf16 (auto) trains in bf16 on this machine's CPU."""
    return precision.resolve_bf16(TrainArgs().bf16, torch.device("cpu"))


@torch.no_grad()
def as_the_default_run_rounds_it(model: torch.nn.Module) -> torch.nn.Module:
    """A freshly loaded base model with every floating-point weight rounded to bf16 (and kept in its dtype), as a
    run with the default precision leaves the frozen weights where it trains in bf16 (train/precision.py);
    unchanged where the default is fp32. Wrapped in the run's adapter afterwards (an init that does not rewrite
    the base), it computes what the run's returned model computes, bit for bit."""
    if default_run_is_bf16():
        for param in model.parameters():
            if param.is_floating_point():
                param.data = param.data.to(torch.bfloat16).to(param.dtype)
    return model


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    """Same names and values; atol=0 means bit-identical."""
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())[:5]
    for name in a:
        if atol == 0:
            assert torch.equal(a[name], b[name]), f"{name}: max diff {(a[name] - b[name]).abs().max().item()}"
        else:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=lambda m: f"{name}: {m}")
