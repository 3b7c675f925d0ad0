"""Hot-swapping a LoRA adapter: replace an adapter's weights and scalings in place by another adapter's (PEFT's
`hotswap_adapter`), keeping every tensor object, so a compiled model (torch.compile) runs the new adapter without
recompiling and optimizers or hooks holding the tensors keep working.

    model = PeftModel.from_pretrained(base, "adapter-0")
    prepare_model_for_compiled_hotswap(model, target_rank=64)   # only if ranks or alphas differ; before compiling
    model = torch.compile(model)
    hotswap_adapter(model, "adapter-1", adapter_name="default")

The new adapter must target no module the old one does not (a module it leaves out gets zero weights), and agree
on the options the weights do not carry (use_rslora, lora_dropout, alpha_pattern, use_dora), as in PEFT. Ranks and
lora_alpha may differ: a smaller rank is zero-padded into the existing tensors (B A is unchanged by zero rows of A
and zero columns of B), and the per-layer scalings s = lora_alpha / r are updated in place.
`prepare_model_for_compiled_hotswap` makes those scalings tensors (a changed Python float would recompile) and pads
every A and B to `target_rank`, the largest rank to be swapped in.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from lorakit.adapter_files import read_adapter_config, read_adapter_weights
from lorakit.methods.lora.config import LoraConfig
from lorakit.methods.lora.layer import LoraLayer
from lorakit.model_files import adapter_directory
from lorakit.state import PREFIX

# config options that change the adapter's output besides its weights, rank and alpha: they must be equal
KEYS_TO_MATCH = ("use_rslora", "lora_dropout", "alpha_pattern", "use_dora")
A_NAMES, B_NAMES = ("lora_A", "lora_embedding_A"), ("lora_B", "lora_embedding_B")


def _peft_model(model):
    from lorakit.peft_helpers import _peft_model_of  # (a PeftModel, a compiled one, or an injected model)

    return _peft_model_of(model)[0]


def _lora_layers(peft_model) -> list[tuple[str, LoraLayer]]:
    return [(path, layer) for path, layer in peft_model._holders() if isinstance(layer, LoraLayer)]


def _groups(layer: LoraLayer) -> int:
    return getattr(layer, "groups", 1)  # a grouped convolution's A holds one block of rows per group


# ---- preparing for compilation ---------------------------------------------------------------------------------
def prepare_model_for_compiled_hotswap(model: nn.Module, *, target_rank: int | None = None,
                                       config: LoraConfig | dict[str, LoraConfig] | None = None,
                                       check_compiled: str = "error") -> None:
    """Make every LoRA scaling a tensor and, with target_rank, zero-pad every adapter's A and B to that rank (outputs
    unchanged), so that later hot-swaps of adapters with other ranks or alphas do not recompile a compiled model.
    Call it after loading the first adapter and before torch.compile. config: LoraConfig(s) whose r (and
    rank_pattern) are set to target_rank. check_compiled: "error", "warn" or "ignore" for an already compiled
    model."""
    if check_compiled not in ("error", "warn", "ignore"):
        raise ValueError(f"check_compiles should be one of 'error', 'warn', or 'ignore', got '{check_compiled}' "
                         "instead.")
    if hasattr(model, "_orig_mod") or getattr(model, "_compiled_call_impl", None) is not None:
        if check_compiled == "error":
            raise ValueError("Call prepare_model_for_compiled_hotswap *before* compiling the model")
        if check_compiled == "warn":
            warnings.warn("prepare_model_for_compiled_hotswap was called with a model that is already compiled. This "
                          "will likely result in re-compilation, hurting performance. Call the function before "
                          "compiling the model.", UserWarning, stacklevel=2)
    try:
        layers = _lora_layers(_peft_model(model))
    except ValueError:
        layers = []
    if not layers:
        raise ValueError("No adapter layers found on the model, make sure call `prepare_model_for_compiled_hotswap` "
                         "after loading the first adapter and before loading the second adapter.")
    if target_rank is not None:
        for path, layer in layers:  # every check before anything is padded
            if target_rank % _groups(layer):
                raise ValueError(f"Trying to pad a Conv2d LoRA adapter with groups={_groups(layer)} to target rank "
                                 f"{target_rank}, but the target rank is not divisible by {_groups(layer)}. Please "
                                 f"choose a target rank that is divisible by {_groups(layer)}. ({path})")
            for name, r in layer.r.items():
                if r > target_rank:
                    raise ValueError(f"Trying to pad the adapter to the target rank {target_rank}, but the original "
                                     f"rank is larger ({r}). This is not possible. ({path}, adapter {name!r})")
    for _, layer in layers:
        for name, value in layer.scaling.items():
            if not isinstance(value, torch.Tensor):
                layer.scaling[name] = torch.tensor(float(value), device=next(layer.parameters()).device)
        if target_rank is not None:
            for name in list(layer.r):
                _pad_adapter(layer, name, target_rank)
    if config and target_rank is not None:
        for lora_config in ([config] if isinstance(config, LoraConfig) else config.values()):  # one, or {name: c}
            lora_config.r = target_rank
            for key in lora_config.rank_pattern:
                lora_config.rank_pattern[key] = target_rank


def _pad_adapter(layer: LoraLayer, name: str, target_rank: int) -> None:
    """Replace the adapter's A and B parameters by zero-padded ones of rank target_rank (B A unchanged)."""
    for attr in layer.adapter_param_names:
        holder = getattr(layer, attr)
        if name not in holder or not (attr in A_NAMES or attr in B_NAMES):
            continue
        module = holder[name]
        param = module.weight if isinstance(module, nn.Module) else module
        new = _padded(param.detach(), target_rank, attr in A_NAMES, _groups(layer))
        if new is None:
            continue
        new = nn.Parameter(new, requires_grad=param.requires_grad)
        if isinstance(module, nn.Module):
            module.weight = new
            _set_shape_attributes(module, target_rank, attr in A_NAMES)
        else:
            holder[name] = new
    layer.r[name] = target_rank


def _padded(weight: torch.Tensor, target_rank: int, is_a: bool, groups: int) -> torch.Tensor | None:
    """weight with its rank dimension (A: 0; B: 1, per group for a grouped convolution's B) zero-padded."""
    rank_dim = 0 if is_a else 1
    target = target_rank if is_a else target_rank // groups
    if weight.shape[rank_dim] == target:
        return None
    out = weight.new_zeros(weight.shape[:rank_dim] + (target,) + weight.shape[rank_dim + 1:])
    _copy_into(out, weight, groups if is_a else 1)
    return out


def _copy_into(destination: torch.Tensor, source: torch.Tensor, a_groups: int = 1) -> None:
    """Copy `source` into the leading part of `destination` along the dimension where they differ; a grouped
    convolution's A (a_groups > 1) is copied block by block, each group's rows at the start of its block."""
    if source.shape[0] != destination.shape[0]:
        if a_groups > 1:
            src, dst = source.shape[0] // a_groups, destination.shape[0] // a_groups
            for g in range(a_groups):
                destination[g * dst:g * dst + src].copy_(source[g * src:(g + 1) * src])
        else:
            destination[:source.shape[0]].copy_(source)
    else:
        destination[:, :source.shape[1]].copy_(source)


def _set_shape_attributes(module: nn.Module, rank: int, is_a: bool) -> None:
    if isinstance(module, nn.Linear):
        setattr(module, "out_features" if is_a else "in_features", rank)
    elif isinstance(module, nn.modules.conv._ConvNd):
        setattr(module, "out_channels" if is_a else "in_channels", rank)


def _with_adapter_name(key: str, adapter_name: str) -> str:
    """A file key as the model names the parameter: `x.lora_A.weight` -> `x.lora_A.default.weight`."""
    parts = key.split(".")
    at = max((i for i, part in enumerate(parts) if part.startswith("lora_")), default=len(parts) - 1)
    return ".".join(parts[:at + 1] + [adapter_name] + parts[at + 1:])


# ---- swapping ------------------------------------------------------------------------------------------------
def hotswap_adapter(model, model_name_or_path: str, adapter_name: str, torch_device=None, **kwargs) -> None:
    """Load the adapter at `model_name_or_path` into the existing adapter `adapter_name` of `model` (a PeftModel,
    compiled or not), in place."""
    peft_model = _peft_model(model)
    if adapter_name not in peft_model.peft_config:
        raise ValueError(f"Adapter {adapter_name} does not exist; this model has {sorted(peft_model.peft_config)}")
    directory = adapter_directory(model_name_or_path, kwargs)
    new = read_adapter_config(directory)
    old = peft_model.peft_config[adapter_name]
    if new.peft_type != old.peft_type:
        raise ValueError(f"Incompatible PEFT types found: {old.peft_type.value} and {new.peft_type.value}")
    if not isinstance(new, LoraConfig):
        raise ValueError(f"Hotswapping only supports LORA but {new.peft_type.value} was passed.")
    for key in KEYS_TO_MATCH:
        if getattr(old, key) != getattr(new, key):
            raise ValueError(f"Configs are incompatible: for {key}, {getattr(old, key)} != {getattr(new, key)}")
    weights = read_adapter_weights(directory, allow_pickle=kwargs.get("allow_pickle", False))
    hotswap_adapter_from_state_dict(peft_model, weights, adapter_name, new, torch_device)


def hotswap_adapter_from_state_dict(model, state_dict: dict[str, torch.Tensor], adapter_name: str,
                                    config: LoraConfig, torch_device=None) -> None:
    """Swap `adapter_name`'s weights for `state_dict`'s (keys as in an adapter file), and its scalings for
    `config`'s. A tensor of the same shape is copied in; a smaller rank is zero-padded into the existing tensor; a
    larger one replaces the tensor's contents (a compiled model then recompiles). A module the new adapter has no
    weights for gets zeros (no effect)."""
    peft_model = _peft_model(model)
    layers = _lora_layers(peft_model)
    if any(adapter_name in layer.merged_adapters for _, layer in layers):
        raise ValueError(f"Cannot hot-swap adapter '{adapter_name}' because it is currently merged into the base "
                         "weights. Please unmerge the adapter first by calling `peft_model.unmerge_adapter()`; "
                         "unmerging after a swap of merged weights would otherwise corrupt them.")
    live = peft_model.tuners[adapter_name].state_tensors()
    unexpected = [k for k in state_dict if k not in live]
    if unexpected:
        raise RuntimeError("Hot swapping the adapter did not succeed, unexpected keys found: "
                           f"{', '.join(_with_adapter_name(k, adapter_name) for k in unexpected)}.")
    with torch.no_grad():
        for key, target in live.items():  # first the shape checks, then the swap
            value = state_dict.get(key)
            if value is not None and value.dim() != target.dim():
                raise ValueError(f"Incompatible shapes found for LoRA weights {key}: {tuple(target.shape)} vs "
                                 f"{tuple(value.shape)}")
        groups = {f"{path}.": _groups(layer) for path, layer in layers}
        for key, target in live.items():
            value = state_dict.get(key)
            if value is None:
                target.zero_()
                continue
            value = value.to(device=torch_device or target.device, dtype=target.dtype)
            if value.shape == target.shape:
                target.copy_(value)
            elif all(n <= o for n, o in zip(value.shape, target.shape)):
                is_a = any(f".{a}." in key or key.endswith(f".{a}") for a in A_NAMES)
                a_groups = next((g for p, g in groups.items() if key.startswith(PREFIX + p)), 1)
                target.zero_()
                _copy_into(target, value, a_groups if is_a else 1)
            else:  # a larger rank: the tensor object stays, its contents change shape
                target.data = value.clone()
    for path, layer in layers:
        if not layer.has_adapter(adapter_name):
            continue
        layer.lora_alpha[adapter_name] = config.alpha_for(path)
        scaling = config.scaling_for(path)
        current = layer.scaling.get(adapter_name)
        if isinstance(current, torch.Tensor):
            current.fill_(scaling)  # the same tensor: a compiled graph keeps reading it
        else:
            layer.scaling[adapter_name] = scaling
        a = next(getattr(layer, n)[adapter_name] for n in A_NAMES if n in layer.adapter_param_names)
        layer.r[adapter_name] = (a.weight if isinstance(a, nn.Module) else a).shape[0]
    config.inference_mode = peft_model.peft_config[adapter_name].inference_mode
    peft_model.tuners[adapter_name].config = config
