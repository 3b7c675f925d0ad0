"""Locating, caching and loading base models: the embedded defaults (offline), local directories, Hub ids."""

from lorakit.models.embedded import (
    ALIASES,
    MINILM,
    SMOLLM2,
    EmbeddedModel,
    EmbeddedModelMissingError,
    cache_root,
    converted_model_dir,
    embedded_model_for,
    ensure_converted,
    resolve_model_path,
)
from lorakit.models.loading import TASK_AUTO_CLASSES, default_device, load_model_and_tokenizer

__all__ = [
    "ALIASES",
    "MINILM",
    "SMOLLM2",
    "TASK_AUTO_CLASSES",
    "EmbeddedModel",
    "EmbeddedModelMissingError",
    "cache_root",
    "converted_model_dir",
    "default_device",
    "embedded_model_for",
    "ensure_converted",
    "load_model_and_tokenizer",
    "resolve_model_path",
]
