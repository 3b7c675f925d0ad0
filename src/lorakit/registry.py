"""Method registry: one place maps a method name to its config class and the layer types it wraps.

    @register_method("lora")
    class LoraMethod(AdapterMethod):
        config_cls = LoraConfig
        layers = {nn.Linear: LoraLinear, nn.Embedding: LoraEmbedding, Conv1D: LoraLinear}

Registering is all a method needs to do to be injectable by `get_peft_model`, loadable from an
`adapter_config.json`, and run through the conformance suite (tests/conformance).
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from lorakit.config import PeftConfig, suggest

METHODS: dict[str, type["AdapterMethod"]] = {}


class AdapterMethod:
    """What the engine needs to know about a method. Subclasses are registered, never instantiated."""

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[PeftConfig]]
    # base layer type -> adapter layer class wrapping it (looked up along the base type's MRO)
    layers: ClassVar[dict[type[nn.Module], type[nn.Module]]] = {}

    @classmethod
    def layer_class_for(cls, module: nn.Module) -> type[nn.Module] | None:
        for klass in type(module).__mro__:
            if klass in cls.layers:
                return cls.layers[klass]
        return None

    @classmethod
    def extra_trainable_parameters(cls, model: nn.Module, config: PeftConfig, adapter_name: str) -> list[str]:
        """Names (as in `model.named_parameters()`) of base parameters this method also trains and saves,
        e.g. biases. Empty by default."""
        return []

    @classmethod
    def sample_config(cls, target_modules: list[str], identity: bool) -> PeftConfig:
        """A small config targeting `target_modules`, used by the conformance suite.

        identity=True must give an adapter that leaves the model's output unchanged (the method's standard
        init); identity=False must give a random, non-trivial adapter.
        """
        raise NotImplementedError


def register_method(name: str):
    """Class decorator adding a method under `name` and its config's `peft_type`; duplicates fail at import."""

    def decorator(method_cls: type[AdapterMethod]) -> type[AdapterMethod]:
        keys = {name.lower(), method_cls.config_cls.peft_type.lower()}
        for key in keys:
            if key in METHODS:
                raise RuntimeError(f"adapter method {key!r} is registered twice ({METHODS[key].__name__}, "
                                   f"{method_cls.__name__})")
        method_cls.name = name.lower()
        for key in keys:
            METHODS[key] = method_cls
        return method_cls

    return decorator


def get_method(name_or_type: str) -> type[AdapterMethod]:
    """The method registered under a name ("lora") or a PEFT type ("LORA")."""
    method = METHODS.get(str(name_or_type).lower())
    if method is None:
        names = sorted({m.name for m in METHODS.values()})
        raise ValueError(f"Unknown adapter method {name_or_type!r}{suggest(str(name_or_type).lower(), names)}. "
                         f"lorakit supports: {', '.join(names)}.")
    return method


def method_for_config(config: PeftConfig) -> type[AdapterMethod]:
    if not isinstance(config, PeftConfig):
        raise TypeError(f"Expected an adapter config such as LoraConfig, got {type(config).__name__}")
    return get_method(config.peft_type)


def registered_methods() -> list[type[AdapterMethod]]:
    """Each registered method once, sorted by name."""
    return sorted(set(METHODS.values()), key=lambda m: m.name)
