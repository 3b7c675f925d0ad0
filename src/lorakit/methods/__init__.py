"""Adapter methods. Importing this package registers every method (see lorakit.registry)."""

from lorakit.methods import lora  # noqa: F401  (registers "lora")
