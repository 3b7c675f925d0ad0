"""Merging adapters into the base weights, and taking the adapter layers out again (PeftModel's merge methods).

    merge:   W <- W + delta_a for each adapter a (Tuner's layers define delta; DoRA rescales instead)
    unmerge: the inverse, in reverse order
    merge_and_unload / unload: the plain transformers model, merged or restored

Warnings and errors follow PEFT's wording, so code (and tests) written against PEFT see the same messages.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from lorakit.adapter_layer import AdapterHolder, AdapterLayer
from lorakit.modules_to_save import ModulesToSaveWrapper
from lorakit.tuner import MERGEABLE


def adapter_layers(peft_model) -> list[tuple[str, AdapterLayer]]:
    return [(p, m) for p, m in peft_model._holders() if isinstance(m, AdapterLayer)]


def checked_adapter_names(peft_model, adapter_names) -> list[str]:
    """The adapters an operation applies to: the given names (each must exist), or the active adapters."""
    if adapter_names is None:
        return list(peft_model.active_adapters)
    if isinstance(adapter_names, str):
        raise TypeError(f"adapter_names should be a list of strings, got {adapter_names!r}.")
    names = list(adapter_names)
    missing = [n for n in names if n not in peft_model.peft_config]
    if missing:
        raise ValueError(f"Adapter {', '.join(missing)} does not exist; this model has {sorted(peft_model.peft_config)}")
    return names


def merge(peft_model, adapter_names=None, safe_merge: bool = False) -> None:
    """W <- merge_weight(W) for each named adapter (default: the active ones) not merged yet. safe_merge: first check
    that no merged weight would hold NaN/inf; nothing is merged if one would."""
    names = checked_adapter_names(peft_model, adapter_names)
    peft_model._require(MERGEABLE, names, "merges")
    layers = adapter_layers(peft_model)
    for path, layer in layers:  # refuse before anything is merged
        if any(layer.has_adapter(n) for n in names) and (reason := layer.merge_refusal()):
            raise NotImplementedError(f"{path}: {reason}. Nothing was merged.")
    _warn_already_merged(layers, names)
    if safe_merge:
        for path, layer in layers:
            for name in names:
                if layer.has_adapter(name) and name not in layer.merged_adapters and not torch.isfinite(
                        layer.merge_weight(name, layer.dense_base_weight())).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken "
                                     f"(merging it would put NaN/inf into {path}; diverged training?). Nothing was "
                                     "merged.")
    for _, layer in layers:
        layer.merge(names)


def _warn_already_merged(layers, names: list[str]) -> None:
    merged = sorted({n for _, layer in layers for n in layer.merged_adapters})
    if not merged:
        return
    new = [n for n in names if any(layer.has_adapter(n) and n not in layer.merged_adapters for _, layer in layers)]
    if new:
        warnings.warn(f"Already following adapters were merged {','.join(merged)}. You are now additionally merging "
                      f"{','.join(new)}.", UserWarning, stacklevel=4)
    else:
        warnings.warn("All adapters are already merged, nothing to do.", UserWarning, stacklevel=4)


def unmerge(peft_model, warn: bool = True) -> None:
    """Subtract every merged update (in reverse order), restoring the base weights."""
    layers = adapter_layers(peft_model)
    if warn and not any(layer.merged_adapters for _, layer in layers):
        warnings.warn("Already unmerged. Nothing to do.", UserWarning, stacklevel=4)
        return
    for _, layer in layers:
        layer.unmerge()


def unwrap_all(peft_model, keep_trained: bool) -> nn.Module:
    """Replace every adapter layer by its base layer and every modules_to_save wrapper by the module to keep;
    returns the transformers model."""
    model = peft_model.get_base_model()
    for path, holder in reversed(peft_model._holders()):  # innermost first: nested layers (MHA's out_proj)
        model.set_submodule(path, unwrapped(holder, keep_trained))
    return model


def unwrapped(holder: AdapterHolder, keep_trained: bool) -> nn.Module:
    """What takes a holder's place when adapters are removed: the base layer, or for a modules_to_save wrapper the
    trained copy of the active adapter (keep_trained) or the original."""
    if isinstance(holder, ModulesToSaveWrapper):
        return holder.active_copy() if keep_trained else holder.original_module
    return holder.base_layer
