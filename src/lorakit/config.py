"""Base configuration for every adapter method: PEFT's enums, JSON read/write and validation helpers.

Configs are dataclasses whose field names follow HuggingFace PEFT, so an `adapter_config.json` written by PEFT
loads here and ours loads in PEFT. As in PEFT, a config may be changed after it is built (`config.r = 16`); it is
therefore validated twice: when built (`__post_init__`) and whenever it is used (injected, saved, loaded: the
engine calls `validate()`), so a bad value set later is refused before it takes effect. `dataclasses.replace`
derives a new, validated config.

Fields PEFT has for features lorakit does not implement are declared with `unsupported(...)`: accepted at their
neutral value (PEFT's default, so PEFT-written files and PEFT-style code work), refused otherwise with an error
naming the field, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from lorakit.tasks import TASK_TYPES, TaskType

CONFIG_NAME = "adapter_config.json"

# Fields that configure one run only (PEFT's LoraConfig.runtime_config): never written to, nor read from, a file.
RUNTIME_ONLY_KEYS = {"runtime_config"}


class PeftType(str, enum.Enum):
    """PEFT's adapter types (the `peft_type` of adapter_config.json). All of PEFT's names are here so that files and
    code naming any of them compare as in PEFT; lorakit implements those with a registered method (registry.py)."""

    PROMPT_TUNING = "PROMPT_TUNING"
    MULTITASK_PROMPT_TUNING = "MULTITASK_PROMPT_TUNING"
    P_TUNING = "P_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    LORA = "LORA"
    ADALORA = "ADALORA"
    ADAMSS = "ADAMSS"
    BOFT = "BOFT"
    ADAPTION_PROMPT = "ADAPTION_PROMPT"
    IA3 = "IA3"
    BEFT = "BEFT"
    LILY = "LILY"
    LOHA = "LOHA"
    LOKR = "LOKR"
    OFT = "OFT"
    POLY = "POLY"
    LN_TUNING = "LN_TUNING"
    VERA = "VERA"
    FROD = "FROD"
    PVERA = "PVERA"
    FOURIERFT = "FOURIERFT"
    GLORA = "GLORA"
    XLORA = "XLORA"
    HRA = "HRA"
    VBLORA = "VBLORA"
    UNILORA = "UNILORA"
    CPT = "CPT"
    MISS = "MISS"
    RANDLORA = "RANDLORA"
    ROAD = "ROAD"
    TRAINABLE_TOKENS = "TRAINABLE_TOKENS"
    HIRA = "HIRA"
    SHIRA = "SHIRA"
    C3A = "C3A"
    WAVEFT = "WAVEFT"
    OSF = "OSF"
    DELORA = "DELORA"
    GRALORA = "GRALORA"
    CARTRIDGE = "CARTRIDGE"
    TINYLORA = "TINYLORA"
    PSOFT = "PSOFT"
    PEANUT = "PEANUT"
    SHADOW = "SHADOW"
    SUPERTUNING = "SUPERTUNING"
    DEFT = "DEFT"

    def __str__(self) -> str:
        return self.value


def as_peft_type(value):
    """PeftType for a known name ("LORA", PeftType.LORA), else the value unchanged (a method registered outside
    lorakit may use its own name)."""
    try:
        return PeftType(str(getattr(value, "value", value)).upper())
    except ValueError:
        return value


def _neutral(value, default) -> bool:
    """PEFT's default, or an empty/off value that means the same: the feature is not used."""
    if value is None or value is False or (isinstance(value, (dict, list, tuple, set)) and not value):
        return True
    return value == default


def unsupported(default: Any, feature: str, neutral: Callable[[Any], bool] | None = None):
    """A dataclass field for a PEFT option lorakit does not implement: accepted at a neutral value (see `_neutral`, or
    `neutral(value)`), refused by `PeftConfig.validate` otherwise. `feature` says what the option does in PEFT."""
    metadata = {"unsupported": feature, "neutral": neutral}
    if isinstance(default, (dict, list, set)):
        return field(default_factory=type(default), metadata=metadata)
    return field(default=default, metadata=metadata)


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
                raise ValueError(f"`{name}` cannot be used when `target_modules` is a str. ({owner}.{name}="
                                 f"{getattr(config, name)!r} with target_modules={target!r}, a regex or 'all-linear': "
                                 "list module names instead, or select layers in the regex)")
    if config.layers_pattern and config.layers_to_transform is None:
        raise ValueError(f"When `layers_pattern` is specified, `layers_to_transform` must also be specified. "
                         f"({owner}.layers_pattern={config.layers_pattern!r}: give the layer indices to adapt)")
    layers = config.layers_to_transform
    if layers is not None and not (isinstance(layers, int) or (
            isinstance(layers, (list, tuple)) and all(isinstance(i, int) for i in layers))):
        raise ValueError(f"{owner}.layers_to_transform must be an int or a list of ints, got {layers!r}")
    normalise_target_fields(config)


def normalise_target_fields(config) -> None:
    """As PEFT: a list of target_modules / exclude_modules becomes a set (the order never matters, and PEFT code
    compares sets); the other list fields stay lists (JSON writes every set as a sorted list)."""
    for name in ("target_modules", "exclude_modules"):
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)):
            setattr(config, name, set(value))
    for name in ("modules_to_save", "layers_pattern", "layers_to_transform"):
        value = getattr(config, name, None)
        if isinstance(value, (tuple, set)):
            setattr(config, name, sorted(value) if isinstance(value, set) else list(value))


def suggest(word: str, options) -> str:
    """' (did you mean X?)' when a close match exists, else ''."""
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass
class PeftConfig:
    """Fields every adapter config shares. Subclasses set `peft_type` (a PeftType) and extend `validate`."""

    # The method: each config class sets its own default (LoraConfig: PeftType.LORA); a value given to the
    # constructor is replaced by it, as in PEFT. On the class, `LoraConfig.peft_type` is that default.
    peft_type: PeftType | str | None = None
    # peft_type -> config class; filled as config classes are defined, so reading a config needs no registry
    _classes: ClassVar[dict[str, type["PeftConfig"]]] = {}

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("peft_type"):
            cls.peft_type = as_peft_type(cls.peft_type)
            PeftConfig._classes[str(getattr(cls.peft_type, "value", cls.peft_type))] = cls

    # What the model does: a TaskType (CAUSAL_LM, SEQ_CLS, SEQ_2_SEQ_LM, TOKEN_CLS, QUESTION_ANS,
    # FEATURE_EXTRACTION); strings are turned into the enum, which still compares equal to them.
    task_type: TaskType | str | None = None
    # The base model this adapter was trained on (filled in on save).
    base_model_name_or_path: str | None = None
    # The revision (Hub branch, tag or commit) of the base model; informational, as in PEFT.
    revision: str | None = None
    # True: the adapter is frozen (loading for inference).
    inference_mode: bool = False
    # Written by PEFT: how to rebuild a base model of no known task (informational).
    auto_mapping: dict | None = None
    # Written by PEFT: the PEFT version that saved the file (informational).
    peft_version: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field (ValueError naming the field, the value and what is allowed) and normalise values
        (strings to enums, tuples to lists). Runs when the config is built and again whenever it is used, since
        fields may be assigned after construction. Subclasses extend it (calling super().validate() first)."""
        owner = type(self).__name__
        self.peft_type = type(self).peft_type_default()
        if self.task_type is not None:
            name = str(getattr(self.task_type, "value", self.task_type))
            if name not in TASK_TYPES:
                raise ValueError(f"Invalid task type: '{self.task_type}'. Must be one of the following task types: "
                                 f"{', '.join(TASK_TYPES)}. ({owner}.task_type)")
            self.task_type = TaskType(name)
        if not isinstance(self.inference_mode, bool):
            raise ValueError(f"{owner}.inference_mode must be True or False, got {self.inference_mode!r}")
        for f in dataclasses.fields(self):
            feature = f.metadata.get("unsupported")
            if feature is None:
                continue
            value = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            neutral = f.metadata["neutral"] or (lambda v, d=default: _neutral(v, d))
            if not neutral(value):
                raise ValueError(f"{owner}.{f.name}={value!r}: lorakit does not implement this PEFT option "
                                 f"({feature}); leave it at its default ({default!r})")

    @classmethod
    def peft_type_default(cls):
        """The PeftType of this config class (its peft_type field's default)."""
        field_ = cls.__dataclass_fields__.get("peft_type")
        return field_.default if field_ is not None else cls.__dict__.get("peft_type")

    def fill_from_run(self, total_steps: int) -> "PeftConfig":
        """This config with the fields a training run decides filled in, where the user left them unset (AdaLoRA's
        total_step = the run's optimizer steps). The trainer calls it before building the model. Default: unchanged."""
        return self

    # ---- JSON -----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The adapter_config.json content: every field, enums as their names, sets as sorted lists."""
        out = {"peft_type": str(getattr(self.peft_type, "value", self.peft_type))}
        for f in dataclasses.fields(self):
            if f.name == "peft_type":
                continue
            if f.name in RUNTIME_ONLY_KEYS:
                continue
            value = getattr(self, f.name)
            if isinstance(value, enum.Enum):
                value = value.value
            out[f.name] = sorted(value) if isinstance(value, (set, frozenset)) else value
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "PeftConfig":
        """Build from a dict such as a PEFT `adapter_config.json`.

        Every field PEFT 0.21 writes is a field here (the options lorakit does not implement are accepted at their
        neutral value and refused otherwise, see `unsupported`). Keys no config of this method knows come from a
        newer PEFT version: they are ignored with a warning, as PEFT does.
        """
        data = dict(data)
        if "peft_type" not in data:
            raise TypeError(f"The {cls.__name__} config that is trying to be loaded is missing required keys: "
                            "{'peft_type'}.")
        raw = data.pop("peft_type")
        peft_type = str(getattr(raw, "value", raw))
        if peft_type.upper() != str(cls.peft_type_default()):
            raise ValueError(f"{cls.__name__} cannot read a config of peft_type {peft_type!r}")
        for key in RUNTIME_ONLY_KEYS:
            data.pop(key, None)
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(k for k in data if k not in known)
        if unknown:
            hints = "".join(suggest(k, known) for k in unknown if suggest(k, known))
            warnings.warn(f"Unexpected keyword arguments {unknown} for class {cls.__name__}, these are ignored. This "
                          f"probably means that the configuration was saved by a newer PEFT version{hints}; lorakit "
                          "ignores keys it does not know, so check that the adapter does not rely on them.",
                          UserWarning, stacklevel=3)
        return cls(**{k: v for k, v in data.items() if k in known})

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Write adapter_config.json into `save_directory` (created if missing)."""
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory!r} is a file; give a directory")
        self.validate()
        os.makedirs(save_directory, exist_ok=True)
        data = self.to_dict()
        if kwargs.get("auto_mapping_dict") is not None:
            data["auto_mapping"] = kwargs["auto_mapping_dict"]
        write_json_atomic(os.path.join(save_directory, CONFIG_NAME), data)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None,
                        **kwargs) -> "PeftConfig":
        """Read `adapter_config.json` from a directory (or `<directory>/<subfolder>`); `PeftConfig.from_pretrained`
        picks the method's class. Keyword arguments naming config fields override the file's values."""
        directory = os.fspath(pretrained_model_name_or_path)
        if subfolder:
            directory = os.path.join(directory, subfolder)
        data = read_config_json(directory)
        if "peft_type" not in data:
            raise TypeError(f"The {cls.__name__} config that is trying to be loaded is missing required keys: "
                            f"{{'peft_type'}}. ({os.path.join(directory, CONFIG_NAME)} is not an adapter config)")
        fields = {f.name for f in dataclasses.fields(config_class_for(data.get("peft_type", cls.peft_type)))}
        data.update({k: v for k, v in kwargs.items() if k in fields})
        config = config_from_json(data, os.path.join(directory, CONFIG_NAME))
        if not isinstance(config, cls):
            raise ValueError(f"{directory} holds a {type(config).__name__}, not a {cls.__name__}")
        return config

    @classmethod
    def from_json_file(cls, path_json_file: str) -> dict:
        """The dict of a config JSON file, without run-only keys (as PEFT's)."""
        data = read_config_json(os.path.dirname(path_json_file) or ".", os.path.basename(path_json_file))
        for key in RUNTIME_ONLY_KEYS & set(data):
            warnings.warn(f"The configuration file contains a `{key}` key. This is ignored. Runtime configurations "
                          "are only valid at runtime.", UserWarning, stacklevel=2)
            del data[key]
        return data

    @property
    def is_prompt_learning(self) -> bool:
        """False: lorakit's methods adapt layers, not prompts (PEFT's property, read by code written for PEFT)."""
        return False

    @property
    def is_adaption_prompt(self) -> bool:
        return False


def config_class_for(peft_type) -> type[PeftConfig]:
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


def read_config_json(directory: str, name: str = CONFIG_NAME) -> dict:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No {name} in {directory!r}. An adapter directory holds {CONFIG_NAME} and "
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
