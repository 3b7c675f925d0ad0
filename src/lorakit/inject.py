"""Finding the modules an adapter targets, and replacing them by adapter layers.

Matching follows HuggingFace PEFT, so the same config selects the same modules:
- a list of names: a module matches when its full name equals an entry or ends with "." + entry;
- a string: a regex that must match the full module name (re.fullmatch);
- "all-linear": every linear-like layer (LINEAR_TYPES: nn.Linear, Conv1D, and the types other packages add,
  e.g. methods/quant's NF4Linear) except the output head (lm_head, or the classifier for SEQ_CLS);
- None: the architecture's default (query and value projections), see DEFAULT_TARGETS.
"""

from __future__ import annotations

import re
from typing import Callable

from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from lorakit.adapter_layer import AdapterHolder, AdapterLayer, UnsupportedLayerError
from lorakit.modules_to_save import ModulesToSaveWrapper
from lorakit.tasks import SEQ_CLS_HEAD_NAMES

ALL_LINEAR = "all-linear"
# Base layer types that "all-linear" targets. A package defining another linear layer (a quantized one) adds
# its type with register_linear_type; the methods that can wrap it list it in their `layers`.
LINEAR_TYPES: list[type[nn.Module]] = [nn.Linear, Conv1D]
# Checks run on every targeted base layer before it is wrapped: each returns None, or why no adapter may wrap
# the layer although its type looks wrappable (e.g. a layer quantized by another library that subclasses
# nn.Linear but holds packed weights). Added with register_base_layer_check.
BASE_LAYER_CHECKS: list[Callable[[nn.Module], str | None]] = []
# Default targets when target_modules is None (as PEFT's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"], "phi3": ["qkv_proj"], "phi": ["q_proj", "v_proj"], "opt": ["q_proj", "v_proj"],
    "bart": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "gpt_neox": ["query_key_value"],
    "bloom": ["query_key_value"], "falcon": ["query_key_value"], "gptj": ["q_proj", "v_proj"],
    "t5": ["q", "v"], "mt5": ["q", "v"], "bert": ["query", "value"], "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"], "deberta-v2": ["query_proj", "value_proj"], "distilbert": ["q_lin", "v_lin"],
}


def register_linear_type(layer_type: type[nn.Module]) -> None:
    if layer_type not in LINEAR_TYPES:
        LINEAR_TYPES.append(layer_type)


def register_base_layer_check(check: Callable[[nn.Module], str | None]) -> None:
    if check not in BASE_LAYER_CHECKS:
        BASE_LAYER_CHECKS.append(check)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, tuple(LINEAR_TYPES))


def name_matches(spec: str | list[str], name: str) -> bool:
    """PEFT's rule: regex full match for a string, exact name or dotted suffix for a list."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in spec)


def layer_index(name: str, layers_pattern: str | list[str] | None) -> int | None:
    """The index of the transformer block a module sits in ("model.layers.3.mlp" -> 3)."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = next((m for p in patterns if (m := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name))), None)
    return int(match.group("idx")) if match else None


def candidate_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) for every module that could be targeted: adapter internals are skipped, and an
    existing adapter layer stands for its base layer (so a second adapter can be added to it)."""
    out, holders = [], []
    for name, module in model.named_modules():
        if any(name.startswith(h) for h in holders):
            continue
        if isinstance(module, AdapterHolder):
            holders.append(f"{name}.")
        out.append((name, module))
    return out


def base_of(module: nn.Module) -> nn.Module:
    if isinstance(module, AdapterLayer):
        return module.base_layer
    if isinstance(module, ModulesToSaveWrapper):
        return module.original_module
    return module


def output_head_names(model: nn.Module, task_type: str | None) -> set[str]:
    """The output head(s) "all-linear" must leave alone."""
    if not isinstance(model, PreTrainedModel):
        return set()
    head = model.get_output_embeddings()
    if head is None and task_type == "SEQ_CLS":
        head = next((getattr(model, n) for n in SEQ_CLS_HEAD_NAMES if hasattr(model, n)), None)
    return {name for name, m in model.named_modules() if head is not None and base_of(m) is head}


def resolve_target_spec(model: nn.Module, config, defaults: dict[str, list[str]] | None = None) -> str | list[str]:
    """config.target_modules, or the architecture's entry of `defaults` (a method's own table; DEFAULT_TARGETS)."""
    if config.target_modules is not None:
        return config.target_modules
    defaults = DEFAULT_TARGETS if defaults is None else defaults
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in defaults:
        raise ValueError(
            f"target_modules is not set and lorakit has no default targets for model type {model_type!r}; "
            f"set target_modules, e.g. 'all-linear' or some of: {', '.join(candidate_names(model))}"
        )
    return defaults[model_type]


def candidate_names(model: nn.Module, limit: int = 40) -> list[str]:
    """Short names (last name component) of linear-like, embedding, conv and attention modules, for error messages."""
    kinds = (*LINEAR_TYPES, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)
    names = sorted({n.rsplit(".", 1)[-1] for n, m in candidate_modules(model) if n and isinstance(base_of(m), kinds)})
    return names[:limit] + (["..."] if len(names) > limit else [])


def find_targets(model: nn.Module, config, method) -> list[str]:
    """Full names of the modules `config` targets in `model`; raises a clear error when none or a wrong type."""
    spec = resolve_target_spec(model, config, getattr(method, "default_target_modules", None))
    all_linear = isinstance(spec, str) and spec.lower() == ALL_LINEAR
    excluded_heads = output_head_names(model, config.task_type) if all_linear else set()
    targets = []
    for name, module in candidate_modules(model):
        if not name or isinstance(module, ModulesToSaveWrapper) or name in excluded_heads:
            continue
        if config.modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in config.modules_to_save):
            continue
        excluded = getattr(config, "exclude_modules", None)  # a field of most methods, not all (VeRA has none)
        if excluded and name_matches(excluded, name):
            continue
        if all_linear:
            if not is_linear(base_of(module)):
                continue
        elif not name_matches(spec, name):
            continue
        if not _in_selected_layers(name, spec, config):
            continue
        problem = next((p for check in BASE_LAYER_CHECKS if (p := check(base_of(module)))), None)
        if problem:
            raise TypeError(f"target module {name!r} is {problem}. Or leave it out of target_modules.")
        refusal = method.wrap_refusal(base_of(module))
        if refusal:
            raise UnsupportedLayerError(f"target module {name!r} is a {type(base_of(module)).__name__}, {refusal}. "
                                        "Choose other target_modules.")
        targets.append(name)
    if not targets:
        raise ValueError(
            f"target_modules={spec!r} matched no module of {type(model).__name__}"
            f"{_filters_note(config)}. Candidate module names: {', '.join(candidate_names(model))}. "
            "Use a name or dotted suffix (e.g. 'q_proj'), a regex over full names, or 'all-linear'."
        )
    return targets


def _in_selected_layers(name: str, spec, config) -> bool:
    """PEFT's rule: the filter applies to names matched by dotted suffix only, never to a name listed in
    full, and an empty list means no filter (LoraConfig rejects it with a string target)."""
    layers = config.layers_to_transform
    if layers is None or layers == [] or isinstance(spec, str) or name in spec:
        return True
    index = layer_index(name, config.layers_pattern)
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def _filters_note(config) -> str:
    notes = [f"{k}={getattr(config, k)!r}" for k in ("exclude_modules", "layers_to_transform")
             if getattr(config, k, None) is not None]
    return f" (with {', '.join(notes)})" if notes else ""


def inject_adapter(model: nn.Module, config, adapter_name: str, method) -> list[str]:
    """Wrap every target (or add to its existing adapter layer) and add `modules_to_save` copies."""
    targets = find_targets(model, config, method)
    for name in targets:
        module = model.get_submodule(name)
        if isinstance(module, AdapterLayer):
            if not isinstance(module, tuple(method.layers.values())):
                raise ValueError(f"{name} already holds a {type(module).__name__}; one model holds adapters of "
                                 f"one method only")
            layer = module
            layer.add_adapter(adapter_name, config, name)
        else:
            layer = method.layer_class_for(module)(module)
            layer.add_adapter(adapter_name, config, name)
            model.set_submodule(name, layer)
        layer.train(layer.base_layer.training)  # new dropout modules follow the model's train/eval mode
    add_trainable_copies(model, config.modules_to_save or [], adapter_name, config.task_type)
    return targets


def add_trainable_copies(model: nn.Module, names: list[str], adapter_name: str, task_type: str | None) -> None:
    """Give the adapter a trainable copy of each module whose name ends with an entry of `names`. As in PEFT
    (peft.utils.other._set_trainable) the ending need not start at a dot: "norm" also takes "input_layernorm"."""
    for wanted in names:
        found = [n for n, m in candidate_modules(model)
                 if n and n.endswith(wanted) and not isinstance(m, AdapterLayer)]
        if not found and not (task_type == "SEQ_CLS" and wanted in SEQ_CLS_HEAD_NAMES):
            raise ValueError(f"modules_to_save entry {wanted!r} matches no module of {type(model).__name__}; "
                             f"candidates: {', '.join(candidate_names(model))}")
        for name in found:
            module = model.get_submodule(name)
            if not isinstance(module, ModulesToSaveWrapper):
                module = ModulesToSaveWrapper(module)
                model.set_submodule(name, module)
            module.add_adapter(adapter_name, module_name=name)
