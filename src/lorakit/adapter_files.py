"""Reading and writing adapter directories: `adapter_config.json` + `adapter_model.safetensors`.

Writes are atomic (temporary files, then rename). Only safetensors is read unless the caller opts in
to a pickle `adapter_model.bin`, which is then read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lorakit.config import CONFIG_NAME, PeftConfig, config_from_json, read_config_json, write_json_atomic

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"


RUN_ADAPTER_SUBDIR = "adapter"  # where `lorakit train` puts the adapter inside its output_dir
RUN_MODEL_SUBDIR = "model"  # ... and a whole model (full fine-tuning, or a result merged by a trainer strategy)


def resolve_adapter_dir(path_or_id: str, subfolder: str | None = None, **hub_kwargs) -> str:
    """The adapter directory meant by `path_or_id`: the directory itself, `<dir>/adapter` for a training run's
    output_dir, or a Hugging Face Hub repo id ("owner/name"), of which only the adapter files are downloaded
    (lorakit.integrations.hub). subfolder: the adapter inside that directory or repo (PEFT's `subfolder`, e.g. a
    second adapter saved as `<dir>/<name>`). hub_kwargs: revision, token, cache_dir, local_files_only,
    force_download (used only for a download)."""
    path = os.fspath(path_or_id)
    if subfolder:
        local = os.path.join(path, subfolder)
        if os.path.isdir(path) or os.path.isdir(local):
            return resolve_adapter_dir(local)
    if os.path.isfile(os.path.join(path, CONFIG_NAME)):
        return path
    if os.path.isfile(os.path.join(path, RUN_ADAPTER_SUBDIR, CONFIG_NAME)):
        return os.path.join(path, RUN_ADAPTER_SUBDIR)
    if os.path.isfile(os.path.join(path, RUN_MODEL_SUBDIR, "config.json")):
        raise FileNotFoundError(f"{path!r} is a training run whose result is a whole model ({path}/model: full "
                                "fine-tuning, or a strategy that changed the base weights), not an adapter; load "
                                f"it as the model (--model {path}) without an adapter")
    if os.path.isdir(path):
        raise FileNotFoundError(f"adapter {path!r} holds no {CONFIG_NAME}, so it is not an adapter directory; give "
                                "the directory written by save_pretrained (a training run's output_dir/adapter)")
    if os.path.exists(path):
        raise FileNotFoundError(f"adapter {path!r} is a file; give the adapter directory")
    if path.startswith((".", "/", "~")) or path.count("/") > 1 or not path:
        raise FileNotFoundError(f"adapter {path!r} does not exist")
    from lorakit.integrations.hub import download_adapter

    return download_adapter(path, subfolder=subfolder, **hub_kwargs)


def write_adapter(directory: str, config: PeftConfig, tensors: dict[str, torch.Tensor]) -> None:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, WEIGHTS_NAME)
    tmp = f"{path}.tmp{os.getpid()}"
    save_file({k: v.cpu() for k, v in tensors.items()}, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)
    write_json_atomic(os.path.join(directory, CONFIG_NAME), config.to_dict())


def read_adapter_config(directory: str) -> PeftConfig:
    return config_from_json(read_config_json(directory), os.path.join(directory, CONFIG_NAME))


def read_adapter_weights(directory: str, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    path = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(path):
        try:
            return load_file(path)
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path} is not a readable safetensors file ({err}); the adapter is corrupt "
                             "or was not fully written.") from None
    pickle_path = os.path.join(directory, PICKLE_WEIGHTS_NAME)
    if os.path.isfile(pickle_path):
        if not allow_pickle:
            raise ValueError(
                f"{directory} holds only {PICKLE_WEIGHTS_NAME}, a pickle file. lorakit reads safetensors by "
                "default; pass allow_pickle=True to read it (with torch.load(weights_only=True)) if you trust it."
            )
        return torch.load(pickle_path, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"No {WEIGHTS_NAME} in {directory!r}; the adapter directory is incomplete.")
