"""Training checkpoints: everything needed to continue a run exactly, written atomically.

    checkpoint-<step>/
      trainable.safetensors     trainable parameters by name (adapter, biases, heads; all weights for full),
                                and base weights a training hook changes (ReLoRA's merges, Delta-LoRA)
      adapter_config.json       with adapter_model.safetensors: the adapter at this step, usable as is
      optimizer.safetensors     optimizer tensors ("<param index>.<key>"); optimizer.json the rest
      scheduler.json            learning-rate schedule position
      rng-rank<r>.safetensors   each process's torch RNG; rng-rank<r>.json Python and NumPy RNG
      hooks.safetensors         training hooks' state (AdaLoRA budget, LISA's draw, LoRA-drop's blocks);
                                hooks.json the rest
      trainer_state.json        step, data position, the run config, a fingerprint of what cannot change
                                within a run (resume.py) and the loss window and timings (meter.py)
      labels.json               SEQ_CLS: the class names in id order (label_names.py)

A checkpoint is filled in `checkpoint-<step>.tmp` and renamed when complete, so a kill leaves either
the previous checkpoints or the new one, never half of one. No pickle anywhere.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lorakit.atomic import replace_directory
from lorakit.config import write_json_atomic

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_NAME = "trainer_state.json"


# ---- writing -------------------------------------------------------------------------------------
def temp_dir_for(output_dir: str, step: int) -> str:
    path = os.path.join(output_dir, f"checkpoint-{step}.tmp")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def write_training_state(directory: str, trainable: dict[str, torch.Tensor], optimizer_state: dict,
                         scheduler_state: dict, trainer_state: dict) -> None:
    """Rank-0 part of a checkpoint (everything but the RNG files), from whole (gathered) tensors."""
    save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()},
              os.path.join(directory, "trainable.safetensors"))
    tensors, meta = split_optimizer_state(optimizer_state)
    save_file(tensors, os.path.join(directory, "optimizer.safetensors"))
    write_json_atomic(os.path.join(directory, "optimizer.json"), meta)
    write_json_atomic(os.path.join(directory, "scheduler.json"), scheduler_state)
    write_json_atomic(os.path.join(directory, STATE_NAME), trainer_state)


def write_rng_state(directory: str, rank: int) -> None:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    save_file(tensors, os.path.join(directory, f"rng-rank{rank}.safetensors"))
    np_state = np.random.get_state()
    write_json_atomic(os.path.join(directory, f"rng-rank{rank}.json"), {
        "python": _to_json(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    })


def publish(temp_dir: str, output_dir: str, step: int, save_total_limit: int | None) -> str:
    """Rename the finished temporary directory into place, then drop the oldest checkpoints."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    replace_directory(temp_dir, final)  # same step saved again (e.g. after a resume): swapped, never deleted first
    if save_total_limit:
        for path in list_checkpoints(output_dir)[:-save_total_limit]:
            if path != final:
                shutil.rmtree(path, ignore_errors=True)
    return final


def split_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """torch optimizer state_dict -> (tensors for safetensors, JSON-able rest)."""
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": _to_json(state["param_groups"]), "scalars": scalars}


def write_hook_state(directory: str, hooks) -> None:
    """Each training hook's state_dict(), tensors to safetensors and the rest to JSON, keyed by hook name."""
    tensors, values = {}, {}
    for hook in hooks:
        for key, value in hook.state_dict().items():
            if isinstance(value, torch.Tensor):
                tensors[f"{hook.name}/{key}"] = value.detach().cpu().contiguous()
            else:
                values[f"{hook.name}/{key}"] = value
    if tensors:
        save_file(tensors, os.path.join(directory, "hooks.safetensors"))
    write_json_atomic(os.path.join(directory, "hooks.json"), values)


# ---- reading -------------------------------------------------------------------------------------
def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints in output_dir, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_RE.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isfile(os.path.join(path, STATE_NAME)):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def resolve_checkpoint(spec: str, output_dir: str) -> str:
    """"latest" -> the newest checkpoint in output_dir; otherwise a checkpoint directory."""
    if spec == "latest":
        found = list_checkpoints(output_dir)
        started = os.path.isdir(output_dir) and any(name == "run_config.yaml" or name.startswith("checkpoint-")
                                                    for name in os.listdir(output_dir))
        if not found and not started:
            raise FileNotFoundError(f"resume_from_checkpoint=latest, but {output_dir!r} holds no run to resume; "
                                    "check output_dir, or leave out resume_from_checkpoint to start a new run")
        if not found:
            raise FileNotFoundError(
                f"resume_from_checkpoint=latest, but {output_dir!r} holds no complete checkpoint: the run there "
                "stopped before its first one (set train.save_steps to keep checkpoints). Start it again with "
                "--overwrite (without resume_from_checkpoint), or choose another output_dir.")
        return found[-1]
    if not os.path.isfile(os.path.join(spec, STATE_NAME)):
        raise FileNotFoundError(f"resume_from_checkpoint={spec!r} is not a checkpoint directory (no {STATE_NAME})")
    return spec


def read_trainer_state(directory: str) -> dict:
    with open(os.path.join(directory, STATE_NAME), encoding="utf-8") as fh:
        return json.load(fh)


def read_training_state(directory: str, expected_names) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(trainable tensors by name, optimizer state dict, scheduler state dict) of a checkpoint; the tensor
    names must be exactly `expected_names` (this run's trainable parameters)."""
    saved = load_file(os.path.join(directory, "trainable.safetensors"))
    if saved.keys() != set(expected_names):
        missing = sorted(set(expected_names) - saved.keys())[:3]
        raise ValueError(f"checkpoint {directory} does not hold this run's trainable parameters "
                         f"(e.g. missing {missing}); it was made with another model or adapter config")
    tensors = load_file(os.path.join(directory, "optimizer.safetensors"))
    with open(os.path.join(directory, "optimizer.json"), encoding="utf-8") as fh:
        meta = json.load(fh)
    with open(os.path.join(directory, "scheduler.json"), encoding="utf-8") as fh:
        scheduler_state = json.load(fh)
    return saved, join_optimizer_state(tensors, meta), scheduler_state


def read_hook_state(directory: str) -> dict[str, dict]:
    """hook name -> the state_dict() it saved (empty for a checkpoint without hook files)."""
    path = os.path.join(directory, "hooks.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as fh:
        merged = json.load(fh)
    tensor_path = os.path.join(directory, "hooks.safetensors")
    if os.path.isfile(tensor_path):
        merged.update(load_file(tensor_path))
    states: dict[str, dict] = {}
    for key, value in merged.items():
        hook, name = key.split("/", 1)
        states.setdefault(hook, {})[name] = value
    return states


def load_hook_state(directory: str, hooks) -> None:
    """Give every hook back its state; a checkpoint without hook files (older) leaves the hooks fresh."""
    states = read_hook_state(directory)
    if not states:
        return
    for hook in hooks:
        hook.load_state_dict(states.get(hook.name, {}))


def load_rng_state(directory: str, rank: int) -> None:
    path = os.path.join(directory, f"rng-rank{rank}.safetensors")
    if not os.path.isfile(path):  # resumed with more processes than saved: the new ranks keep fresh RNGs
        return
    tensors = load_file(path)
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    with open(os.path.join(directory, f"rng-rank{rank}.json"), encoding="utf-8") as fh:
        states = json.load(fh)
    random.setstate(_to_tuple(states["python"]))
    kind, keys, *rest = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))


def join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Inverse of split_optimizer_state. Parameters are keyed by index, or by name for sharded models."""
    state: dict[int | str, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        param, name = key.rsplit(".", 1)
        state.setdefault(int(param) if param.isdigit() else param, {})[name] = value
    groups = meta["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}


def _to_json(value):
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value


def _to_tuple(value):
    return tuple(_to_tuple(v) for v in value) if isinstance(value, list) else value
