"""PEFT's public exception classes, for code that catches them by name.

    try:
        get_peft_model(model, LoraConfig(target_modules=["q_proj"]))
    except NoMatchingPeftModuleError: ...

Both are what PEFT exports; NoMatchingPeftModuleError stays a ValueError, as in PEFT.
"""


class PeftError(Exception):
    """Base class of the errors lorakit raises under PEFT's names."""


class NoMatchingPeftModuleError(PeftError, ValueError):
    """target_modules (with exclude_modules, layers_to_transform, modules_to_save) selected no module to adapt."""
