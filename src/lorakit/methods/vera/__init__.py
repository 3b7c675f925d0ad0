"""VeRA (Kopiczko et al. 2023, https://arxiv.org/abs/2310.11454); importing this package registers "vera"."""

from lorakit.methods.vera.config import VeraConfig
from lorakit.methods.vera.layer import VeraLinear
from lorakit.methods.vera.tuner import VeraTuner

__all__ = ["VeraConfig", "VeraLinear", "VeraTuner"]
