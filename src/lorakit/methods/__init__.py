"""Adapter methods. Importing this package registers every method (see lorakit.registry)."""

from lorakit.methods import quant  # noqa: F401  (quantized base layers: before the methods that wrap them)
from lorakit.methods import lora  # noqa: F401  (registers "lora")
from lorakit.methods import vera  # noqa: F401  (registers "vera")
from lorakit.methods import adalora  # noqa: F401  (registers "adalora")
