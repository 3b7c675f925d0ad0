"""Plain functions over adapter state dicts, in HuggingFace PEFT's file format.

File keys are the model's parameter names under the PeftModel (`base_model.model.` + module path) with
the adapter name removed, e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`; a
`modules_to_save` copy is saved under the module's own name (`base_model.model.classifier.weight`);
extra base parameters a method trains (biases) keep their full names.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.adapter_layer import AdapterHolder

PREFIX = "base_model.model."


def adapter_holders(model: nn.Module) -> list[tuple[str, AdapterHolder]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, AdapterHolder)]


def live_adapter_tensors(model: nn.Module, adapter_name: str, extra_names: list[str]) -> dict[str, torch.Tensor]:
    """File key -> the live tensor in `model` (the inner transformers model) for one adapter."""
    out = {}
    for path, holder in adapter_holders(model):
        for key, tensor in holder.adapter_tensors(adapter_name).items():
            out[f"{PREFIX}{path}.{key}"] = tensor
    params = dict(model.named_parameters())
    for name in extra_names:
        out[f"{PREFIX}{name}"] = params[name]
    return out


def detached_copies(live: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous copies of live tensors (e.g. `Tuner.state_tensors()`), keyed as given. Sharded (FSDP)
    tensors are gathered whole, so every process must call this."""
    return {k: _whole(v).detach().contiguous().clone() for k, v in live.items()}


class SizeMismatchError(ValueError, RuntimeError):
    """A file tensor whose shape differs from the model's. A ValueError (lorakit's bad-input error) and a
    RuntimeError (what torch's load_state_dict, and so PEFT, raises), so code written against either catches it."""


def load_adapter_state_dict(model: nn.Module, live: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                            source: str, optional: set[str] = frozenset()) -> None:
    """Copy `state` (file keys) into the adapter's live tensors `live` (`Tuner.state_tensors()`), checking that
    keys and shapes agree; keys in `optional` may be absent from the file.

    Keys naming other parameters of the base model (PEFT saves e.g. the full embedding matrix when it
    is targeted) are loaded into those parameters. Anything else means the adapter was made for
    another model, and is an error that names the first module concerned.
    """
    base_params = {f"{PREFIX}{n}": p for n, p in model.named_parameters()}
    # PEFT with bias="all" also writes `<head>.modules_to_save.bias` (a copy of `<head>.bias`, the trained copy's
    # bias) and `<head>.original_module.bias` (the frozen original, unchanged): both carry nothing new.
    state = {k: v for k, v in state.items()
             if not (".modules_to_save." in k and k.replace(".modules_to_save.", ".", 1) in live)
             and not (".original_module." in k and k.replace(".original_module.", ".", 1) in live)}
    unexpected = [k for k in state if k not in live and k not in base_params]
    missing = [k for k in live if k not in state and k not in optional]
    if unexpected:
        raise ValueError(
            f"{source} has weights for {_module_of(unexpected[0])!r} ({len(unexpected)} unexpected tensors), "
            f"which this {type(model).__name__} does not have: was the adapter trained on a different base model "
            "or with different target_modules?"
        )
    if missing:
        raise ValueError(f"{source} lacks weights for {_module_of(missing[0])!r} ({len(missing)} tensors missing); "
                         "the adapter file does not match its adapter_config.json or this base model.")
    with torch.no_grad():
        for key, value in state.items():
            target = live.get(key, base_params.get(key))
            if tuple(target.shape) != tuple(value.shape):
                raise SizeMismatchError(
                    f"{source}: size mismatch for {key}: {_module_of(key)!r} has shape {tuple(value.shape)} in the "
                    f"file but {tuple(target.shape)} in this model; the adapter was trained on a different base model "
                    "(a resized vocabulary: load with ignore_mismatched_sizes=True to skip these tensors)."
                )
            target.copy_(value)


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _module_of(key: str) -> str:
    """A file key without the PeftModel prefix, i.e. the tensor's path in the base model."""
    return key.removeprefix(PREFIX)
