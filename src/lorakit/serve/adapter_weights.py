"""Reading one adapter directory into the form the serving layers take: per module (A, s*B).

Adapter files written by PEFT or by lorakit both serve (same format: `adapter_config.json` +
`adapter_model.safetensors`, read with lorakit's adapter_files; safetensors only, never pickle). What can be
served is what the batched low-rank kernel computes, `h = W0 x + s B A x` on linear layers:

- LoRA with any rank, alpha, rsLoRA, rank_pattern / alpha_pattern (the scaling is per module);
- not other methods (VeRA, IA3, prompt tuning, ...), not the LoRA options that change more than that
  (DoRA's magnitudes, trained biases, modules_to_save copies, inits that rewrote the base weights), and
  not LoRA on embeddings or convolutions. Those are refused at load with a message naming what is wrong.

The file must hold exactly the modules its config targets in this base model (the same check as
`PeftModel.from_pretrained`), with matching shapes: an adapter trained on another base fails here.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.adapter_files import read_adapter_config, read_adapter_weights
from lorakit.config import CONFIG_NAME
from lorakit.serve.lora_ops import SERVABLE_BASE_LAYERS, linear_features

KEY_PATTERN = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
# init_lora_weights values whose training started by rewriting W0 into a residual (W0 - s B A): the adapter only
# makes sense on that rewritten base. PEFT can convert such adapters into plain LoRA when saving.
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "eva")


class AdapterLoadError(ValueError):
    """The adapter cannot be served (bad files, another method, another base model); the message says why."""


@dataclass
class ServingAdapter:
    """An adapter in host memory, ready to be copied into a compute slot."""

    name: str
    path: str
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (A (r, d_in), s*B (d_out, r))

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.modules.values())

    @property
    def max_rank(self) -> int:
        return max(a.shape[0] for a, _ in self.modules.values())


# (config field, test of its value, why that cannot be batched): the LoRA options outside h = W0 x + s B A x
UNSERVABLE_OPTIONS = (
    ("use_dora", bool, "it is a DoRA adapter (use_dora=true), whose per-adapter magnitudes rescale W0 + s B A"),
    ("bias", lambda v: v not in (None, "none"), "it trained biases of the base model (bias={value!r})"),
    ("modules_to_save", bool, "it replaces whole modules of the base model (modules_to_save={value!r})"),
    ("init_lora_weights", lambda v: isinstance(v, str) and v.lower().startswith(BASE_REWRITING_INITS),
     "it was initialised with init_lora_weights={value!r}, which rewrote the base weights; convert it to a "
     "plain LoRA adapter when saving"),
    ("lora_bias", bool, "it has a bias on lora_B (lora_bias=true)"),
)


class ModelLayers:
    """The base model's linear layers by name, and a weightless copy of it for target matching."""

    def __init__(self, model: nn.Module) -> None:
        self.model_type = getattr(getattr(model, "config", None), "model_type", None)
        self.features = {name: linear_features(m) for name, m in model.named_modules()
                         if isinstance(m, SERVABLE_BASE_LAYERS)}
        self.kinds = {name: type(m).__name__ for name, m in model.named_modules()}
        self.dtype = next(model.parameters()).dtype
        self._model = model
        self._twin: nn.Module | None = None

    def twin(self) -> nn.Module:
        """The same architecture on the meta device (no memory): targets resolve on it exactly as on the
        pristine base, even after the serving layers have replaced some of its modules."""
        if self._twin is None:
            with torch.device("meta"):
                self._twin = type(self._model)(self._model.config)
        return self._twin


def check_servable(config, where: str) -> None:
    from lorakit.methods.lora.config import LoraConfig

    if not isinstance(config, LoraConfig):
        raise _not_lora(where, config.peft_type)
    for field, unservable, why in UNSERVABLE_OPTIONS:
        value = getattr(config, field, None)
        if unservable(value):
            raise AdapterLoadError(f"{where} cannot be served with other adapters in one batch: "
                                   f"{why.format(value=value)}")
    if config.task_type not in (None, "CAUSAL_LM"):
        raise AdapterLoadError(f"{where} is a {config.task_type} adapter; lorakit serve generates text (CAUSAL_LM)")


def _check_method(directory: str, where: str) -> None:
    """Refuse another method's adapter by its peft_type before its config is parsed: the reason is the method,
    whatever else its config holds (a file that cannot be read is left to read_adapter_config to explain)."""
    try:
        with open(os.path.join(directory, CONFIG_NAME), encoding="utf-8") as fh:
            peft_type = json.load(fh).get("peft_type")
    except (OSError, ValueError, AttributeError):
        return
    if isinstance(peft_type, str) and peft_type.upper() != "LORA":
        raise _not_lora(where, peft_type)


def _not_lora(where: str, peft_type: str) -> AdapterLoadError:
    return AdapterLoadError(f"{where} is a {peft_type} adapter; lorakit serve batches LoRA adapters only (merge it "
                            "into the base model and serve that instead)")


def load_serving_adapter(name: str, directory: str, layers: ModelLayers) -> ServingAdapter:
    """Read, check and convert one adapter directory (see the module docstring); AdapterLoadError if unservable."""
    where = f"adapter {name!r} ({directory})"
    try:
        _check_method(directory, where)
        config = read_adapter_config(directory)
        check_servable(config, where)
        tensors = read_adapter_weights(directory, allow_pickle=False)
    except AdapterLoadError:
        raise
    except (OSError, ValueError) as err:
        raise AdapterLoadError(f"{where} cannot be loaded: {err}") from None
    pairs = _pairs_by_module(tensors, where)
    _check_targets(config, set(pairs), layers, where)
    modules = {}
    for module, (a, b) in pairs.items():
        modules[module] = _checked_pair(config, module, a, b, layers, where)
    return ServingAdapter(name, directory, modules)


def _pairs_by_module(tensors: dict[str, torch.Tensor], where: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = KEY_PATTERN.match(key)
        if match is None:
            raise AdapterLoadError(f"{where} holds {key!r}, a tensor the batched LoRA kernel cannot use (only "
                                   "lora_A / lora_B weights of linear layers can be served)")
        found.setdefault(match["module"], {})[match["which"]] = tensor
    if not found:
        raise AdapterLoadError(f"{where} holds no LoRA weights")
    for module, pair in found.items():
        if set(pair) != {"A", "B"}:
            raise AdapterLoadError(f"{where} has lora_{'A' if 'B' in pair else 'B'} but not the other half for "
                                   f"{module!r}; the adapter file is incomplete")
    return {module: (pair["A"], pair["B"]) for module, pair in found.items()}


def _check_targets(config, in_file: set[str], layers: ModelLayers, where: str) -> None:
    from lorakit.inject import find_targets
    from lorakit.registry import method_for_config

    for module in sorted(in_file):
        if module not in layers.kinds:
            raise AdapterLoadError(f"{where} has weights for {module!r}, which this base model does not have: was "
                                   "it trained on another base model?")
        if module not in layers.features:
            raise AdapterLoadError(f"{where} adapts {module!r}, a {layers.kinds[module]}; lorakit serve batches "
                                   "LoRA on linear layers only")
    try:
        targeted = set(find_targets(layers.twin(), config, method_for_config(config)))
    except (TypeError, ValueError) as err:
        raise AdapterLoadError(f"{where}: its config does not fit this base model ({err})") from None
    if targeted != in_file:
        odd = sorted(targeted ^ in_file)[0]
        side = "its config targets it but the file has no weights for it" if odd in targeted else \
            "the file has weights for it but its config does not target it"
        raise AdapterLoadError(f"{where} does not match its adapter_config.json at {odd!r}: {side}")


def _checked_pair(config, module: str, a: torch.Tensor, b: torch.Tensor, layers: ModelLayers,
                  where: str) -> tuple[torch.Tensor, torch.Tensor]:
    d_in, d_out = layers.features[module]
    rank = config.rank_for(module)
    if tuple(a.shape) != (rank, d_in) or tuple(b.shape) != (d_out, rank):
        raise AdapterLoadError(f"{where}: {module!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, but "
                               f"this base model with r={rank} needs ({rank}, {d_in}) and ({d_out}, {rank})")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise AdapterLoadError(f"{where}: {module!r} holds NaN or infinite weights")
    scaled_b = b.to(torch.float64) * config.scaling_for(module)
    return a.to(layers.dtype).contiguous(), scaled_b.to(layers.dtype).contiguous()

