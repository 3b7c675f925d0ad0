"""LoRA initialisations, one function per `init_lora_weights` value.

Each function takes the adapter's A and B tensors in "matrix layout" views, A: (r, d_in) and
B: (d_out, r) as in nn.Linear weights, and fills them in place. "kaiming" and "gaussian" set B = 0, so
that s B A = 0 and training starts exactly at the base model (Hu et al. 2021, Sec. 4.1).
New inits (PiSSA, ...) add an entry here; a layer passes its own tensors in.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def init_key(value) -> str:
    """Map a config value (True, False, "gaussian", ...) to a key of INIT_FNS."""
    if value is True:
        return "kaiming"
    if value is False:
        return "random"
    return str(value).lower()


def kaiming(a: torch.Tensor, b: torch.Tensor, r: int) -> None:
    """A as nn.Linear's default init (Kaiming-uniform, a=sqrt(5)), B = 0 (loralib, PEFT)."""
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    nn.init.zeros_(b)


def gaussian(a: torch.Tensor, b: torch.Tensor, r: int) -> None:
    """A ~ N(0, (1/r)^2), B = 0."""
    nn.init.normal_(a, std=1 / r)
    nn.init.zeros_(b)


def random(a: torch.Tensor, b: torch.Tensor, r: int) -> None:
    """Both random (B non-zero): the adapter changes the output from the start. For tests."""
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    nn.init.kaiming_uniform_(b, a=math.sqrt(5))


INIT_FNS = {"kaiming": kaiming, "gaussian": gaussian, "random": random}


def embedding_init(a: torch.Tensor, b: torch.Tensor, r: int, key: str) -> None:
    """Embedding LoRA: A (r, num_embeddings) is looked up like an embedding table, B is (dim, r).

    The reference (loralib) sets A = 0 and B ~ N(0, 1) so that the update starts at zero; "random" draws
    both from N(0, 1).
    """
    if key == "random":
        nn.init.normal_(a)
    else:
        nn.init.zeros_(a)
    nn.init.normal_(b)
