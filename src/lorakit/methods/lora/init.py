"""LoRA initialisations, one function per `init_lora_weights` value.

Every function fills the adapter's factors in place, in "matrix layout": A: (r, d_in) and B: (d_out, r), as
for an nn.Linear weight (a layer hands in views of its own tensors, see `LoraLayer.matrix_factors`), and
returns either None or a new base weight, also (d_out, d_in), that the layer writes into its base layer.

- "kaiming" (True) and "gaussian" set B = 0, so s B A = 0 and training starts exactly at the base model
  (Hu et al. 2021, Sec. 4.1, https://arxiv.org/abs/2106.09685).
- "pissa" / "pissa_niter_K" (Meng et al. 2024, https://arxiv.org/abs/2404.02948) and "olora" (Buyukakyuz 2024,
  https://arxiv.org/abs/2406.01775) move the principal part of W0 into the adapter and return the residual
  W0 - s B A as the new base weight, so the model's output is unchanged at the start.

The numbers are PEFT's (peft/tuners/lora/layer.py: pissa_init, olora_init): the same factorisation, the same
1/s split of the singular values, the same order of floating-point operations, so a PEFT model and a lorakit
model built on the same base hold the same A, B and residual.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

# PEFT's init_lora_weights values lorakit does not implement; named in the error so users know they exist.
UNSUPPORTED_PEFT_INITS = ("loftq", "corda", "eva", "orthogonal", "lora_ga", "mica")
PISSA_NITER = re.compile(r"pissa_niter_(\d+)")


@dataclass(frozen=True)
class InitContext:
    """What an initialisation may need besides A and B."""

    r: int
    scaling: float
    module_name: str
    # The layer's dense base weight in matrix layout (d_out, d_in), fp32; read lazily (only inits that rewrite
    # the base need it, and a quantized base would have to be dequantized for it).
    base_weight: Callable[[], torch.Tensor]


InitFn = Callable[[torch.Tensor, torch.Tensor, InitContext], "torch.Tensor | None"]


def init_key(value) -> str:
    """Map a config value (True, False, "gaussian", "pissa_niter_4", ...) to a key of INIT_FNS."""
    if value is True:
        return "kaiming"
    if value is False:
        return "random"
    key = str(value).lower()
    return "pissa_niter" if PISSA_NITER.fullmatch(key) else key


def init_options(value) -> dict:
    """Keyword arguments of the init function beyond (a, b, ctx): the K of "pissa_niter_K"."""
    match = PISSA_NITER.fullmatch(str(value).lower()) if isinstance(value, str) else None
    return {"niter": int(match.group(1))} if match else {}


def allowed_values(keys) -> str:
    """The config values that select `keys`, for error messages."""
    spelled = {"kaiming": "True", "random": "False", "pissa_niter": "'pissa_niter_K' (K >= 0)"}
    return ", ".join(spelled.get(k, repr(k)) for k in keys)


def rewrites_base(value) -> bool:
    """True when this init_lora_weights value turns the base weight into a residual (PiSSA, OLoRA)."""
    return init_key(value) in RESIDUAL_INITS


# ---- inits that leave the base alone ---------------------------------------------------------------------

def kaiming(a: torch.Tensor, b: torch.Tensor, ctx: InitContext) -> None:
    """A as nn.Linear's default init (Kaiming-uniform, a=sqrt(5)), B = 0 (loralib, PEFT)."""
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    nn.init.zeros_(b)


def gaussian(a: torch.Tensor, b: torch.Tensor, ctx: InitContext) -> None:
    """A ~ N(0, (1/r)^2), B = 0."""
    nn.init.normal_(a, std=1 / ctx.r)
    nn.init.zeros_(b)


def random(a: torch.Tensor, b: torch.Tensor, ctx: InitContext) -> None:
    """Both random (B non-zero): the adapter changes the output from the start. For tests. A and B keep the
    random values the layer created them with (nn.Linear's and nn.Conv2d's Kaiming-uniform, N(0, 1) for
    embeddings), as PEFT's init_lora_weights=False does: the same seed gives PEFT's values."""


# ---- inits that move part of W0 into the adapter -----------------------------------------------------------

def pissa(a: torch.Tensor, b: torch.Tensor, ctx: InitContext, niter: int | None = None) -> torch.Tensor:
    """PiSSA: W0 = U S V^T; A = sqrt(S_r / s) V_r^T, B = U_r sqrt(S_r / s); returns the residual W0 - s B A.

    The 1/s split makes s B A = U_r S_r V_r^T, the principal part. niter=None: exact SVD; niter=K: randomized
    SVD with K subspace iterations (torch.svd_lowrank, Halko et al. 2011), much cheaper for large W0 but drawn
    from torch's random generator (seed it to reproduce).
    """
    weight = ctx.base_weight()
    _check_rank(ctx, weight, "PiSSA")
    r = ctx.r
    if niter is None:
        u, singular, vh = torch.linalg.svd(weight, full_matrices=False)
        u, s, vh = u[:, :r], singular[:r], vh[:r]
    else:
        u, s, v = torch.svd_lowrank(weight, q=r, niter=niter)
        vh, singular = v.t(), s
    _check_numerical_rank(ctx, weight, singular)
    s = s / ctx.scaling
    root = torch.sqrt(s)
    new_a = root[:, None] * vh  # = diag(sqrt(S_r / s)) @ V_r^T
    new_b = u * root[None, :]  # = U_r @ diag(sqrt(S_r / s))
    a.copy_(new_a)
    b.copy_(new_b)
    return weight - ctx.scaling * new_b @ new_a


def olora(a: torch.Tensor, b: torch.Tensor, ctx: InitContext) -> torch.Tensor:
    """OLoRA: W0 = Q R (QR decomposition); B = Q[:, :r], A = R[:r]; returns the residual W0 - s B A.

    As in PEFT, A and B are not divided by s, so s B A is s times the first r rank-one terms of the QR product.
    """
    weight = ctx.base_weight()
    _check_rank(ctx, weight, "OLoRA")
    q, upper = torch.linalg.qr(weight)
    new_b, new_a = q[:, :ctx.r].contiguous(), upper[:ctx.r].contiguous()
    a.copy_(new_a)
    b.copy_(new_b)
    return weight - ctx.scaling * new_b @ new_a


def _check_rank(ctx: InitContext, weight: torch.Tensor, what: str) -> None:
    limit = min(weight.shape)
    if ctx.r > limit:
        raise ValueError(f"LoraConfig.r={ctx.r} is above the rank of {ctx.module_name}'s weight "
                         f"({tuple(weight.shape)}, rank at most {limit}); {what} needs r <= {limit}. Lower r or set "
                         "rank_pattern for this module.")


def _check_numerical_rank(ctx: InitContext, weight: torch.Tensor, singular: torch.Tensor) -> None:
    """Directions with a zero singular value would start as zero rows of A and zero columns of B, which no
    gradient ever moves: refuse r above the weight's numerical rank (tolerance as torch.linalg.matrix_rank)."""
    tol = singular.max() * max(weight.shape) * torch.finfo(torch.float32).eps
    rank = int((singular > tol).sum())
    if rank < ctx.r:
        raise ValueError(f"LoraConfig.r={ctx.r} is above the numerical rank of {ctx.module_name}'s weight "
                         f"({rank} singular values above {float(tol):.2e}); PiSSA needs r <= {rank}. Lower r (or "
                         "rank_pattern for this module).")


INIT_FNS: dict[str, InitFn] = {
    "kaiming": kaiming, "gaussian": gaussian, "random": random,
    "pissa": pissa, "pissa_niter": pissa, "olora": olora,
}
RESIDUAL_INITS = ("pissa", "pissa_niter", "olora")  # the ones returning a new base weight
PLAIN_INITS = ("kaiming", "gaussian", "random")


# ---- embeddings ----------------------------------------------------------------------------------------

def embedding_zero_a(a: torch.Tensor, b: torch.Tensor, ctx: InitContext) -> None:
    """Embedding LoRA: A (r, num_embeddings) is looked up like an embedding table, B is (dim, r). The reference
    (loralib, PEFT) sets A = 0 and B ~ N(0, 1), so the update starts at zero, for True and "gaussian" alike."""
    nn.init.zeros_(a)
    nn.init.normal_(b)


EMBEDDING_INIT_FNS: dict[str, InitFn] = {"kaiming": embedding_zero_a, "gaussian": embedding_zero_a,
                                         "random": random}
