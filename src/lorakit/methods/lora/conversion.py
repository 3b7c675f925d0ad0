"""PiSSA / OLoRA adapter -> plain LoRA adapter for the original base (PEFT's
`save_pretrained(..., path_initial_model_for_weight_conversion=...)`).

PiSSA and OLoRA train on the residual base W_res = W0 - s B0 A0. After training the model is
W_res + s B A = W0 + s (B A - B0 A0), and B A - B0 A0 = [B | -B0] [A ; A0] is a rank-2r LoRA update. So the
converted adapter has A' = [A ; A0] (rows stacked), B' = [B | -B0] (columns stacked), r' = 2r and the same
scaling: lora_alpha' = 2 lora_alpha (alpha / r unchanged), or sqrt(2) lora_alpha with rsLoRA (alpha / sqrt(r)
unchanged); rank_pattern and alpha_pattern doubled. A0, B0 come from the adapter saved right after the
initialisation (`initial_dir`). Loaded on the original W0, the converted adapter gives the trained model, and it
combines with other LoRA adapters like any other.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from lorakit.adapter_files import read_adapter_weights
from lorakit.methods.lora.config import LoraConfig
from lorakit.methods.lora.init import rewrites_base

A_SUFFIXES = (".lora_A.weight", ".lora_embedding_A")  # stacked along rows (dim 0)
B_SUFFIXES = (".lora_B.weight", ".lora_embedding_B")  # stacked along columns (dim 1)


def convert_to_plain_lora(tensors: dict[str, torch.Tensor], config: LoraConfig,
                          initial_dir: str) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """(file tensors, config) of the equivalent rank-2r LoRA adapter on the original base; see the module doc."""
    if config.use_dora:
        raise ValueError("path_initial_model_for_weight_conversion cannot convert a DoRA adapter (use_dora=True): "
                         "its output depends on the norm of the base weight, which the conversion changes")
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ValueError("Passing `path_initial_model_for_weight_conversion` to `save_pretrained` is not supported "
                         "when using `rank_pattern` or `alpha_pattern` at the same time as `use_rslora=True` (the "
                         "scaling of the converted adapter cannot be expressed), as in PEFT")
    initial = read_adapter_weights(initial_dir)
    factor_keys = [k for k in tensors if k.endswith(A_SUFFIXES + B_SUFFIXES)]
    for key in factor_keys:
        if key not in initial or initial[key].shape != tensors[key].shape:
            found = "missing" if key not in initial else f"of shape {tuple(initial[key].shape)}"
            raise ValueError(f"{initial_dir} is not this adapter right after its initialisation: {key} is {found} "
                             f"there (expected shape {tuple(tensors[key].shape)}). Save the adapter with "
                             "save_pretrained() before training and pass that directory.")
    if not rewrites_base(config.init_lora_weights):
        nonzero = [k for k in factor_keys if k.endswith(B_SUFFIXES) and initial[k].abs().max() > 0]
        if nonzero:
            raise ValueError(f"init_lora_weights={config.init_lora_weights!r} leaves the base weight as it is, and "
                             f"the initial adapter in {initial_dir} is not zero ({nonzero[0]}): converting would "
                             "subtract an update the base never lost. Only PiSSA/OLoRA adapters (or ones starting "
                             "at zero) can be converted.")
    out = dict(tensors)
    for key in factor_keys:
        start = initial[key].to(tensors[key].dtype)
        if key.endswith(A_SUFFIXES):
            out[key] = torch.cat([tensors[key], start], dim=0)
        else:
            out[key] = torch.cat([tensors[key], -start], dim=1)
    alpha_factor = math.sqrt(2) if config.use_rslora else 2
    converted = dataclasses.replace(
        config, init_lora_weights=True, r=2 * config.r, lora_alpha=config.lora_alpha * alpha_factor,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: 2 * v for k, v in config.alpha_pattern.items()},
    )
    return out, converted
