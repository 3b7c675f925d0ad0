"""Reading and writing adapter directories: `adapter_config.json` + `adapter_model.safetensors`.

Writes are atomic (temporary files, then rename). Only safetensors is read unless the caller opts in
to a pickle `adapter_model.bin`, which is then read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lorakit.config import CONFIG_NAME, PeftConfig, read_config_json, write_json_atomic

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"


def resolve_adapter_dir(model_id: str, **hub_kwargs) -> str:
    """A local directory as is; otherwise a HuggingFace Hub repo id, downloaded (works for online users)."""
    if os.path.isdir(model_id):
        return model_id
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model_id, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, "*/" + CONFIG_NAME,
                                                           "*/" + WEIGHTS_NAME], **hub_kwargs)
    except Exception as err:  # offline, unknown repo, bad id: all mean the same to the user
        raise FileNotFoundError(
            f"Adapter {model_id!r} is not a local directory and could not be fetched from the Hugging Face Hub "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Pass the directory that "
            f"holds {CONFIG_NAME} and {WEIGHTS_NAME}."
        ) from None


def write_adapter(directory: str, config: PeftConfig, tensors: dict[str, torch.Tensor]) -> None:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, WEIGHTS_NAME)
    tmp = f"{path}.tmp{os.getpid()}"
    save_file({k: v.cpu() for k, v in tensors.items()}, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)
    write_json_atomic(os.path.join(directory, CONFIG_NAME), config.to_dict())


def read_adapter_config(directory: str) -> PeftConfig:
    from lorakit.registry import get_method

    data = read_config_json(directory)
    where = os.path.join(directory, CONFIG_NAME)
    if "peft_type" not in data:
        raise ValueError(f"{where} has no 'peft_type'; it is not an adapter config")
    try:
        return get_method(data["peft_type"]).config_cls.from_dict(data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None


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
