"""PeftModel's files: save_pretrained, from_pretrained and load_adapter, in PEFT's format and with PEFT's options.

An adapter directory holds adapter_config.json + adapter_model.safetensors ("default" in the directory itself,
any other adapter in <directory>/<name>). lorakit writes safetensors only (`safe_serialization=False` is refused:
pickle files can run code when read) and a README.md model card (lorakit.integrations.model_card).
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from typing import NamedTuple

import torch

from lorakit.adapter_files import read_adapter_config, read_adapter_weights, resolve_adapter_dir, write_adapter
from lorakit.adapter_layer import AdapterLayer
from lorakit.config import PeftConfig
from lorakit.integrations.model_card import facts_from_model, write_model_card
from lorakit.state import PREFIX, load_adapter_state_dict

DEFAULT_ADAPTER = "default"
# PEFT's names for embedding layers whose full weights "auto" saves when they are targeted (resized vocabularies)
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")
# keyword arguments of PEFT's loading functions that only steer Hub downloads
HUB_KWARGS = ("revision", "cache_dir", "token", "subfolder", "force_download", "local_files_only", "proxies",
              "use_auth_token")


class LoadResult(NamedTuple):
    """What load_adapter / set_peft_model_state_dict loaded, as torch's `load_state_dict` result (PEFT returns it):
    model keys the file did not provide, and file keys the model has no place for."""

    missing_keys: list[str]
    unexpected_keys: list[str]


# ---- saving ------------------------------------------------------------------------------------------------------
def save_adapters(peft_model, save_directory, selected_adapters=None, safe_serialization: bool = True,
                  save_embedding_layers="auto", is_main_process: bool = True,
                  path_initial_model_for_weight_conversion=None) -> None:
    if not safe_serialization:
        raise ValueError("safe_serialization=False is not supported: lorakit writes adapter weights as safetensors only "
                         "(a pickle file can run code when it is loaded); PEFT and transformers read safetensors")
    if save_embedding_layers not in (True, False, "auto"):
        raise ValueError(f"save_embedding_layers must be True, False or 'auto', got {save_embedding_layers!r}")
    save_directory = os.fspath(save_directory)
    if os.path.isfile(save_directory):
        raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file")
    names = list(peft_model.peft_config) if selected_adapters is None else list(selected_adapters)
    unknown = [n for n in names if n not in peft_model.peft_config]
    if unknown:
        raise ValueError(f"You passed an invalid `selected_adapters` arguments, current supported adapter names are "
                         f"{list(peft_model.peft_config)} - got {names}.")
    for name in names:
        peft_model.peft_config[name].validate()
    base_name = _base_model_name(peft_model.get_base_model())
    files = []  # everything is computed (and every conversion checked) before anything is written
    for name in names:
        tensors = peft_model.adapter_state_dict(name)  # on every process: sharded tensors are gathered
        tensors.update(embedding_tensors(peft_model, name, save_embedding_layers))
        if not is_main_process:
            continue
        config = peft_model.peft_config[name]
        if path_initial_model_for_weight_conversion is not None:
            tensors, config = peft_model.tuners[name].convert_for_initial_model(
                tensors, config, os.fspath(path_initial_model_for_weight_conversion))
        config = dataclasses.replace(config, inference_mode=True,
                                     base_model_name_or_path=config.base_model_name_or_path or base_name)
        files.append((save_directory if name == DEFAULT_ADAPTER else os.path.join(save_directory, name), config,
                      tensors))
    if not is_main_process:
        return
    os.makedirs(save_directory, exist_ok=True)
    write_model_card(save_directory, facts_from_model(peft_model, names))  # README.md (integrations/model_card.py)
    for directory, config, tensors in files:
        write_adapter(directory, config, tensors)


def _base_model_name(model) -> str | None:
    return model.__dict__.get("name_or_path") or getattr(getattr(model, "config", None), "name_or_path", None) or None


def embedding_tensors(peft_model, adapter_name: str, save_embedding_layers) -> dict[str, torch.Tensor]:
    """The full input/output embedding weights to save with an adapter (PEFT's save_embedding_layers): True saves
    them, False not; "auto" saves them when an embedding layer (EMBEDDING_LAYER_NAMES) is targeted, with PEFT's
    warning, or when the vocabulary was resized against the base model's local config.json."""
    model = peft_model.get_base_model()
    config = peft_model.peft_config[adapter_name]
    targeted = _embedding_targeted(model, getattr(config, "target_modules", None))
    if save_embedding_layers == "auto":
        if targeted:
            warnings.warn("Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`.",
                          UserWarning, stacklevel=4)
            save_embedding_layers = True
        elif _vocab_resized(model, config):
            warnings.warn("Setting `save_embedding_layers` to `True` as the embedding layer has been resized during "
                          "finetuning.", UserWarning, stacklevel=4)
            save_embedding_layers = True
        else:
            save_embedding_layers = False
    if not save_embedding_layers:
        return {}
    if not hasattr(model, "get_input_embeddings"):  # PEFT warns and saves the adapter without them
        warnings.warn("Could not identify embedding layer(s) because the model is not a 🤗 transformers model. "
                      "(save_embedding_layers=True needs get_input_embeddings(); the adapter is saved without the "
                      "embedding weights.)", UserWarning, stacklevel=4)
        return {}
    out = {}
    layers = [model.get_input_embeddings(), model.get_output_embeddings()]
    for path, module in model.named_modules():
        wrapped = isinstance(module, AdapterLayer)
        inner = module.base_layer if wrapped else module
        if any(layer is not None and (inner is layer or module is layer) for layer in layers) and \
                (wrapped or not targeted):
            key = f"{path}.base_layer.weight" if wrapped else f"{path}.weight"
            out[f"{PREFIX}{key}"] = inner.weight.detach().clone()
    return out


def _embedding_targeted(model, target_modules) -> bool:
    if isinstance(target_modules, str) and target_modules != "all-linear":
        names = [n for n, _ in model.named_modules()
                 if any(re.match(rf"(.*\.)?{e}$", n) for e in EMBEDDING_LAYER_NAMES)]
        return any(re.fullmatch(target_modules, n) for n in names)
    return bool(target_modules) and not isinstance(target_modules, str) and \
        any(e in target_modules for e in EMBEDDING_LAYER_NAMES)


def _vocab_resized(model, config: PeftConfig) -> bool:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    base = config.base_model_name_or_path
    if not vocab or not base or not os.path.isfile(os.path.join(base, "config.json")):
        return False
    return vocab != type(model.config).from_pretrained(base).vocab_size


# ---- loading -----------------------------------------------------------------------------------------------------
def adapter_directory(model_id, kwargs: dict) -> str:
    """The local adapter directory for model_id (a directory, a run's output_dir, or a Hub id), with PEFT's
    `subfolder=` and Hub options."""
    hub = {k: kwargs[k] for k in HUB_KWARGS if kwargs.get(k) is not None}
    if "use_auth_token" in hub:  # transformers' old name
        hub.setdefault("token", hub.pop("use_auth_token"))
    return resolve_adapter_dir(os.fspath(model_id), **hub)


def check_load_options(kwargs: dict, ephemeral_gpu_offload: bool = False, key_mapping=None) -> None:
    """Refuse PEFT loading options lorakit does not implement, rather than ignoring them."""
    if ephemeral_gpu_offload:
        raise ValueError("ephemeral_gpu_offload=True is not supported by lorakit (it moves CPU-offloaded weights to "
                         "the GPU for DoRA's initialisation); load without it")
    if key_mapping:
        raise ValueError("key_mapping is not supported by lorakit: the adapter's keys must match the model's "
                         "parameter names")
    device_map = kwargs.get("device_map")
    if device_map is not None and single_device(device_map) is None:
        raise ValueError(f"device_map={device_map!r}: lorakit loads an adapter onto one device; give one device "
                         "(device_map='cpu' or {'': 'cuda:0'}), or place the model yourself before loading")
    unknown = sorted(k for k in kwargs if k not in HUB_KWARGS and k not in ("ignore_mismatched_sizes", "allow_pickle",
                                                                            "torch_device", "device_map"))
    if unknown:
        raise TypeError(f"unexpected keyword arguments {unknown}")


def single_device(device_map):
    """The one device a PEFT/accelerate device_map names ("cpu", {"": "cuda:0"}), else None."""
    if isinstance(device_map, (str, torch.device)):
        return device_map
    if isinstance(device_map, dict) and set(device_map) == {""}:
        return device_map[""]
    return None


def load_into(peft_model, adapter_name: str, directory: str, ignore_mismatched_sizes: bool = False,
              allow_pickle: bool = False) -> LoadResult:
    """Copy the adapter file's tensors into `adapter_name`'s live tensors (the adapter exists already)."""
    weights = read_adapter_weights(directory, allow_pickle=allow_pickle)
    return load_state(peft_model, adapter_name, weights, directory, ignore_mismatched_sizes)


def load_state(peft_model, adapter_name: str, weights: dict, source: str,
               ignore_mismatched_sizes: bool = False) -> LoadResult:
    for _, holder in peft_model._holders():  # adapters created on the meta device get real (empty) tensors first
        if isinstance(holder, AdapterLayer) and any(t.is_meta for t in holder.adapter_tensors(adapter_name).values()):
            holder.move_adapter(adapter_name, holder.dense_base_weight().device, empty=True)
    tuner = peft_model.tuners[adapter_name]
    live = tuner.state_tensors()
    kept = _drop_mismatched(peft_model, live, weights) if ignore_mismatched_sizes else weights
    dropped = set(weights) - set(kept)
    load_adapter_state_dict(peft_model.get_base_model(), live, kept, source, tuner.optional_state_keys() | dropped)
    return LoadResult([], [])


def _drop_mismatched(peft_model, live: dict, weights: dict) -> dict:
    """PEFT's ignore_mismatched_sizes=True: tensors whose shape differs from the model's are not loaded (they keep
    their initial values), with PEFT's warning listing them."""
    mismatched = [(k, tuple(v.shape), tuple(live[k].shape)) for k, v in weights.items()
                  if k in live and tuple(v.shape) != tuple(live[k].shape)]
    if mismatched:
        lines = "\n".join(f"- {k}: found shape {a} in the checkpoint and {b} in the model instantiated"
                          for k, a, b in mismatched)
        warnings.warn(f"Some weights of {type(peft_model).__name__} were not initialized from the model checkpoint and "
                      f"are being ignored because you passed `ignore_mismatched_sizes=True`: {lines}.", UserWarning,
                      stacklevel=5)
    dropped = {k for k, _, _ in mismatched}
    return {k: v for k, v in weights.items() if k not in dropped}


def read_config(directory: str, config: PeftConfig | None, is_trainable: bool) -> PeftConfig:
    """The config to load with: the given object itself (as PEFT: the caller's object is used and its inference_mode
    set), or the directory's adapter_config.json."""
    if config is None:
        config = read_adapter_config(directory)
    elif not isinstance(config, PeftConfig):
        raise ValueError(f"The input config must be a PeftConfig, got {config.__class__}")
    config.inference_mode = not is_trainable
    config.validate()
    return config

