"""Base configuration for every adapter method: JSON read/write and validation helpers.

Configs are frozen dataclasses whose field names follow HuggingFace PEFT, so an `adapter_config.json`
written by PEFT loads here and ours loads in PEFT. A config never changes after it is built; use
`dataclasses.replace` to derive a new one.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass
from typing import Any, ClassVar

from lorakit.tasks import TASK_TYPES

CONFIG_NAME = "adapter_config.json"

# Keys PEFT writes that describe the file rather than the adapter; safe to ignore when reading.
INFORMATIONAL_KEYS = {"peft_version", "auto_mapping", "megatron_core", "qalora_group_size", "revision"}


def check_positive(owner: str, name: str, value: Any, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        what = "a positive integer" if integer else "a positive number"
        raise ValueError(f"{owner}.{name} must be {what}, got {value!r}")


def check_range(owner: str, name: str, value: Any, low: float, high: float) -> None:
    """Check low <= value < high."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < high:
        raise ValueError(f"{owner}.{name} must be in [{low}, {high}), got {value!r}")


def check_choice(owner: str, name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{owner}.{name} must be one of {allowed}; got {value!r}")


def check_target_fields(owner: str, config) -> None:
    """The targeting fields layer methods share with PEFT (target_modules, exclude_modules where the method has it,
    modules_to_save, layers_to_transform, layers_pattern): types, combinations, and tuples/sets stored as lists
    (JSON has lists)."""
    for name in ("target_modules", "exclude_modules", "modules_to_save", "layers_pattern"):
        value = getattr(config, name, None)
        if value is not None and not isinstance(value, str) and (
                not isinstance(value, (list, tuple, set)) or not all(isinstance(v, str) for v in value)):
            raise ValueError(f"{owner}.{name} must be a string or a list of strings, got {value!r}")
    target = config.target_modules
    if isinstance(target, (list, tuple, set)) and not target:
        raise ValueError(f"{owner}.target_modules is empty; name at least one module, or use 'all-linear'")
    if isinstance(target, str):
        for name in ("layers_to_transform", "layers_pattern"):
            if getattr(config, name) is not None:
                raise ValueError(f"{owner}.{name}={getattr(config, name)!r} cannot be used with target_modules="
                                 f"{target!r} (a regex or 'all-linear'); list module names instead, or select layers "
                                 "in the regex")
    if config.layers_pattern and config.layers_to_transform is None:
        raise ValueError(f"{owner}.layers_pattern={config.layers_pattern!r} needs layers_to_transform (the layer "
                         "indices to adapt)")
    layers = config.layers_to_transform
    if layers is not None and not (isinstance(layers, int) or (
            isinstance(layers, (list, tuple)) and all(isinstance(i, int) for i in layers))):
        raise ValueError(f"{owner}.layers_to_transform must be an int or a list of ints, got {layers!r}")
    for name in ("target_modules", "exclude_modules", "modules_to_save", "layers_pattern", "layers_to_transform"):
        value = getattr(config, name, None)
        if isinstance(value, (tuple, set)):
            object.__setattr__(config, name, sorted(value) if isinstance(value, set) else list(value))


def suggest(word: str, options) -> str:
    """' (did you mean X?)' when a close match exists, else ''."""
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass(frozen=True)
class PeftConfig:
    """Fields every adapter config shares. Subclasses set `peft_type` (e.g. "LORA")."""

    peft_type: ClassVar[str] = ""
    # peft_type -> config class; filled as config classes are defined, so reading a config needs no registry
    _classes: ClassVar[dict[str, type["PeftConfig"]]] = {}

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.peft_type:
            PeftConfig._classes[cls.peft_type] = cls

    # What the model does: CAUSAL_LM, SEQ_CLS, SEQ_2_SEQ_LM, TOKEN_CLS, QUESTION_ANS, FEATURE_EXTRACTION.
    task_type: str | None = None
    # The base model this adapter was trained on (filled in on save).
    base_model_name_or_path: str | None = None
    # True: the adapter is frozen (loading for inference).
    inference_mode: bool = False

    def __post_init__(self) -> None:
        if self.task_type is not None:
            check_choice(type(self).__name__, "task_type", str(self.task_type), TASK_TYPES)
            object.__setattr__(self, "task_type", str(self.task_type))

    def fill_from_run(self, total_steps: int) -> "PeftConfig":
        """This config with the fields a training run decides filled in, where the user left them unset (AdaLoRA's
        total_step = the run's optimizer steps). The trainer calls it before building the model. Default: unchanged."""
        return self

    # ---- JSON -----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {"peft_type": self.peft_type}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = sorted(value) if isinstance(value, (set, frozenset)) else value
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "PeftConfig":
        """Build from a dict such as a PEFT `adapter_config.json`.

        Keys this config does not know are ignored when they are informational or hold a neutral value
        (None, False, empty), as PEFT writes every option it has; any other unknown key is an error, since
        silently dropping an option would change what the adapter computes.
        """
        data = dict(data)
        peft_type = data.pop("peft_type", cls.peft_type)
        if peft_type != cls.peft_type:
            raise ValueError(f"{cls.__name__} cannot read a config of peft_type {peft_type!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs, unsupported = {}, []
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key not in INFORMATIONAL_KEYS and value not in (None, False, {}, []):
                unsupported.append(f"{key}={value!r}{suggest(key, known)}")
        if unsupported:
            raise ValueError(
                f"{cls.__name__} does not support: {', '.join(unsupported)}. Remove these keys, or use a "
                f"supported option (known fields: {', '.join(sorted(known))})."
            )
        return cls(**kwargs)

    def save_pretrained(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        write_json_atomic(os.path.join(directory, CONFIG_NAME), self.to_dict())

    @classmethod
    def from_pretrained(cls, directory: str) -> "PeftConfig":
        """Read `adapter_config.json` from a directory; `PeftConfig.from_pretrained` picks the method's class."""
        config = config_from_json(read_config_json(directory), os.path.join(directory, CONFIG_NAME))
        if not isinstance(config, cls):
            raise ValueError(f"{directory} holds a {type(config).__name__}, not a {cls.__name__}")
        return config


def config_class_for(peft_type: str) -> type[PeftConfig]:
    """The config class of a PEFT type ("LORA", "VERA", ...), as written in adapter_config.json."""
    key = str(getattr(peft_type, "value", peft_type)).upper()
    if key not in PeftConfig._classes:
        known = sorted(PeftConfig._classes)
        raise ValueError(f"Unknown adapter method {peft_type!r} (peft_type){suggest(key, known)}. lorakit supports: "
                         f"{', '.join(k.lower() for k in known)}.")
    return PeftConfig._classes[key]


def config_from_json(data: dict, where: str) -> PeftConfig:
    """The config of the method named by data["peft_type"]; errors name the file (`where`)."""
    if "peft_type" not in data:
        raise ValueError(f"{where} has no 'peft_type'; it is not an adapter config")
    try:
        return config_class_for(data["peft_type"]).from_dict(data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None


def read_config_json(directory: str) -> dict:
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No {CONFIG_NAME} in {directory!r}. An adapter directory holds {CONFIG_NAME} and "
            "adapter_model.safetensors (written by save_pretrained)."
        )
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the adapter directory is corrupt.") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def write_json_atomic(path: str, data: dict) -> None:
    """Write JSON through a temporary file and a rename, so a crash never leaves half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.write("\n")
    os.replace(tmp, path)
