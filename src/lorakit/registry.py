"""Method registry: one place maps a method name (and its PEFT type) to its Tuner class.

    @register_method("lora")
    class LoraTuner(Tuner):
        config_cls = LoraConfig
        layers = {nn.Linear: LoraLinear, nn.Embedding: LoraEmbedding, Conv1D: LoraLinear}

Registering is all a method needs to do to be injectable by `get_peft_model`, loadable from an
`adapter_config.json`, selectable in a run config (`adapter: {method: lora}`), and run through the
conformance suite (tests/conformance). The lifecycle a Tuner implements is in tuner.py.
"""

from __future__ import annotations

from lorakit.config import PeftConfig, suggest
from lorakit.tuner import Tuner

METHODS: dict[str, type[Tuner]] = {}


def register_method(name: str):
    """Class decorator adding a Tuner under `name` and its config's `peft_type`; duplicates fail at import."""

    def decorator(tuner_cls: type[Tuner]) -> type[Tuner]:
        keys = {name.lower(), tuner_cls.config_cls.peft_type.lower()}
        for key in keys:
            if key in METHODS:
                raise RuntimeError(f"adapter method {key!r} is registered twice ({METHODS[key].__name__}, "
                                   f"{tuner_cls.__name__})")
        tuner_cls.name = name.lower()
        for key in keys:
            METHODS[key] = tuner_cls
        return tuner_cls

    return decorator


def get_method(name_or_type: str) -> type[Tuner]:
    """The method registered under a name ("lora") or a PEFT type ("LORA")."""
    method = METHODS.get(str(getattr(name_or_type, "value", name_or_type)).lower())
    if method is None:
        names = sorted({m.name for m in METHODS.values()})
        raise ValueError(f"Unknown adapter method {name_or_type!r}{suggest(str(name_or_type).lower(), names)}. "
                         f"lorakit supports: {', '.join(names)}.")
    return method


def method_for_config(config: PeftConfig) -> type[Tuner]:
    if not isinstance(config, PeftConfig):
        raise TypeError(f"Expected an adapter config such as LoraConfig, got {type(config).__name__}")
    return get_method(config.peft_type)


def registered_methods() -> list[type[Tuner]]:
    """Each registered method once, sorted by name."""
    return sorted(set(METHODS.values()), key=lambda m: m.name)
