"""PEFT's public helper functions, for code written against PEFT's low-level API.

    model = inject_adapter_in_model(LoraConfig(target_modules=["q_proj"]), model)   # adapter layers, no PeftModel
    tensors = get_peft_model_state_dict(model)                                     # an adapter file's tensors
    set_peft_model_state_dict(model, tensors)                                      # ... and back
    get_model_status(model), get_layer_status(model)                              # PeftModel or injected model

They work on a PeftModel (file keys start with "base_model.model.") and on a plain model holding adapter layers
(keys without that prefix), as in PEFT. `hotswap_adapter` is LoRA's (methods/lora/hotswap.py).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from lorakit import model_status
from lorakit.adapter_files import read_adapter_weights
from lorakit.config import PeftConfig
from lorakit.model import DEFAULT_ADAPTER, PeftModel, parameter_counts
from lorakit.model_files import LoadResult, adapter_directory, embedding_tensors, load_state
from lorakit.registry import method_for_config
from lorakit.state import PREFIX, adapter_holders, detached_copies

# the PeftModel built by inject_adapter_in_model, kept on the model it returns (not a submodule)
_INJECTED = "_lorakit_injected"


def inject_adapter_in_model(peft_config: PeftConfig, model: nn.Module, adapter_name: str = DEFAULT_ADAPTER,
                            low_cpu_mem_usage: bool = False, state_dict: dict[str, torch.Tensor] | None = None
                            ) -> nn.Module:
    """Inject the adapter's layers into `model` in place and return `model` itself (no PeftModel wrapper); the base
    weights are frozen. state_dict: target the modules this adapter state dict has tensors for (only its keys are
    used), e.g. when the config's target_modules are unknown. The model gets `peft_config` ({name: config}), as
    with PEFT."""
    if isinstance(model, PeftModel):
        raise TypeError("inject_adapter_in_model takes a plain model; this one is a PeftModel (use add_adapter)")
    if state_dict is not None:
        peft_config = dataclasses.replace(peft_config, target_modules=_modules_in_state_dict(peft_config, state_dict))
    existing = model.__dict__.get(_INJECTED)
    if existing is not None:
        existing.add_adapter(adapter_name, peft_config, low_cpu_mem_usage=low_cpu_mem_usage)
        existing.set_adapter(existing.active_adapters + [adapter_name])
    else:
        existing = PeftModel(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
        model.__dict__[_INJECTED] = existing
    model.__dict__["peft_config"] = existing.peft_config
    return model


def _modules_in_state_dict(config: PeftConfig, state_dict: dict) -> list[str]:
    """Module paths holding the method's adapter tensors in a state dict (keys `<path>.<tensor name>...`)."""
    names = {attr for layer in method_for_config(config).layers.values() for attr in layer.adapter_param_names}
    paths = set()
    for key in state_dict:
        for attr in names:
            marker = f".{attr}"
            if marker in key:
                paths.add(key.split(marker)[0].removeprefix(PREFIX))
    if not paths:
        raise ValueError(f"the state_dict holds no {type(config).__name__} adapter tensors to target")
    return sorted(paths)


def _peft_model_of(model: nn.Module) -> tuple[PeftModel, bool]:
    """(the PeftModel managing `model`'s adapters, whether keys carry the "base_model.model." prefix). A wrapper
    around a PeftModel (FSDP, DDP: `.module`; torch.compile: `._orig_mod`) is looked through."""
    while not isinstance(model, PeftModel):
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module) or model.__dict__.get(_INJECTED) is not None:
            break
        model = inner
    if isinstance(model, PeftModel):
        return model, True
    injected = model.__dict__.get(_INJECTED)
    if injected is None:
        raise ValueError("this model holds no adapters: use get_peft_model or inject_adapter_in_model first")
    return injected, False


def get_peft_model_state_dict(model: nn.Module, state_dict: dict | None = None, adapter_name: str = DEFAULT_ADAPTER,
                              unwrap_compiled: bool = False, save_embedding_layers="auto") -> dict[str, torch.Tensor]:
    """One adapter's tensors, keyed as in its adapter file (adapter name removed). state_dict: take the values from
    this state dict of the model (e.g. one gathered from shards) instead of the live tensors."""
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    peft_model, prefixed = _peft_model_of(model)
    if adapter_name not in peft_model.peft_config:
        raise ValueError(f"Adapter {adapter_name} does not exist; this model has {sorted(peft_model.peft_config)}")
    tensors = peft_model.adapter_state_dict(adapter_name)
    tensors.update(embedding_tensors(peft_model, adapter_name, save_embedding_layers))
    if state_dict is not None:
        tensors = _values_from(peft_model, adapter_name, tensors, state_dict)
    return tensors if prefixed else {k.removeprefix(PREFIX): v for k, v in tensors.items()}


def _values_from(peft_model: PeftModel, adapter_name: str, tensors: dict, state_dict: dict) -> dict:
    """The same file keys, with values from a state dict of the PeftModel or of the bare model."""
    live = peft_model.tuners[adapter_name].state_tensors()
    by_tensor = {id(t): key for key, t in live.items()}
    out = {}
    for model_key, tensor in peft_model.state_dict(keep_vars=True).items():
        file_key = by_tensor.get(id(tensor))
        if file_key in tensors:
            bare_key = model_key.removeprefix(PREFIX)
            value = state_dict.get(model_key, state_dict.get(bare_key))
            if value is None:
                raise ValueError(f"state_dict lacks {model_key!r} of adapter {adapter_name!r}")
            out[file_key] = value
    return {**tensors, **detached_copies(out)}


def set_peft_model_state_dict(model: nn.Module, peft_model_state_dict: dict[str, torch.Tensor],
                              adapter_name: str = DEFAULT_ADAPTER, ignore_mismatched_sizes: bool = False,
                              low_cpu_mem_usage: bool = False) -> LoadResult:
    """Copy an adapter file's tensors (as get_peft_model_state_dict gives them) into adapter `adapter_name`, which
    must exist; returns the load result. ignore_mismatched_sizes: tensors whose shape differs are left out, with a
    warning."""
    peft_model, _ = _peft_model_of(model)
    if adapter_name not in peft_model.peft_config:
        raise ValueError(f"Adapter {adapter_name} does not exist; this model has {sorted(peft_model.peft_config)} "
                         "(add it first: add_adapter or inject_adapter_in_model)")
    weights = {k if k.startswith(PREFIX) else PREFIX + k: v for k, v in peft_model_state_dict.items()}
    return load_state(peft_model, adapter_name, weights, "the state dict", ignore_mismatched_sizes)


def load_peft_weights(model_id: str, device: str | None = None, **kwargs) -> dict[str, torch.Tensor]:
    """The tensors of an adapter directory (or Hub id), keyed as in the file."""
    weights = read_adapter_weights(adapter_directory(model_id, kwargs), allow_pickle=kwargs.get("allow_pickle", False))
    return {k: v.to(device) for k, v in weights.items()} if device else weights


def get_layer_status(model: nn.Module) -> list[model_status.TunerLayerStatus]:
    """get_layer_status of a PeftModel, or of any model holding adapter layers."""
    if isinstance(model, PeftModel):
        return model.get_layer_status()
    return model_status.layer_status(adapter_holders(model))


def get_model_status(model: nn.Module) -> model_status.TunerModelStatus:
    """get_model_status of a PeftModel, or of any model holding adapter layers (base_model_type "other" for a model
    that is not a transformers model, adapter_model_type "None", as PEFT reports them)."""
    if isinstance(model, PeftModel):
        return model.get_model_status()
    status = model_status.model_status(model, adapter_holders(model), {}, "None", parameter_counts(model))
    if not hasattr(model, "config") or not hasattr(model, "can_generate"):
        status.base_model_type = "other"
    return status



def _original_keys(peft_model: PeftModel) -> dict[str, str]:
    """Base model state dict key (as the model holds it now) -> the key without adapters, for every tensor that is
    not an adapter's: `<layer>.base_layer.weight` -> `<layer>.weight`, `<head>.original_module.weight` ->
    `<head>.weight`."""
    model = peft_model.get_base_model()
    # innermost first: a layer nested in another's base layer (MHA's out_proj) is unwrapped before its parent
    holders = sorted(adapter_holders(model), key=lambda item: -len(item[0]))
    mapping = {}
    for key in model.state_dict():
        original = key
        for path, holder in holders:
            prefix = f"{path}."
            if not original.startswith(prefix):
                continue
            rest = original[len(prefix):]
            attr = rest.split(".", 1)[0]
            if attr in holder.adapter_param_names or attr in holder.adapter_meta_names:
                original = None
                break
            if attr in ("base_layer", "original_module"):
                original = prefix + rest.split(".", 1)[1]
        if original is not None:
            mapping[key] = original
    return mapping


def get_base_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict under its original keys, without any adapter tensor (PEFT's helper): what the
    model's state_dict() was before adapters were injected (merged adapters stay merged in)."""
    peft_model, _ = _peft_model_of(model)
    state = peft_model.get_base_model().state_dict()
    return {original: state[key] for key, original in _original_keys(peft_model).items()}


def set_base_model_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True) -> LoadResult:
    """Load a state dict with the base model's original keys into a model holding adapters (the inverse of
    get_base_model_state_dict); strict: missing or unexpected keys are an error."""
    peft_model, _ = _peft_model_of(model)
    by_original = {original: key for key, original in _original_keys(peft_model).items()}
    unexpected = [k for k in state_dict if k not in by_original]
    missing = [k for k in by_original if k not in state_dict]
    if strict and (missing or unexpected):
        raise RuntimeError(f"Error(s) in loading state_dict: missing keys {missing}, unexpected keys {unexpected}")
    peft_model.get_base_model().load_state_dict({by_original[k]: v for k, v in state_dict.items() if k in by_original},
                                                strict=False)
    return LoadResult(missing, unexpected)
