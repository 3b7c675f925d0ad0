"""Swap a model's RMSNorm and gated-MLP forwards for the fused kernels (rms_norm.py, swiglu.py) that keep less
for the backward, where they compute exactly what the module does.

    swapped = use_fused_modules(model)           # once, after the adapters are in; returns the module names
    with recompute_saved_tensors():              # around each training forward (ops/recompute.py)
        loss = ...

Which modules: any module with a 1-D `weight` and a float `variance_epsilon` (RMSNorm as Llama, Mistral, Qwen2,
Phi-3, SmolLM and most decoder models write it), and any module with `gate_proj`, `up_proj`, `down_proj` and an
`act_fn` (the SwiGLU MLP). Each candidate is probed before it is swapped: its own forward and the fused one run
on the same random input (drawn from a private generator: the run's random state is untouched; eval mode:
no dropout), in fp32 and bf16, and the swap happens only when the outputs are equal bit for bit. A norm written
differently (Gemma's `1 + weight`, a norm with an offset) or another activation fails the probe and keeps its own
forward; nothing is swapped on a model with none of them. The swap sets the module's `forward` attribute
(the class is untouched); `restore_modules(model)` takes it back.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from lorakit.ops.rms_norm import rms_norm
from lorakit.ops.swiglu import silu_mul

_ORIGINAL = "_lorakit_original_forward"
_PROBE_DTYPES = (torch.float32, torch.bfloat16)


def _fused_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _fused_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


def _is_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (isinstance(weight, torch.Tensor) and weight.dim() == 1 and weight.is_floating_point()
            and isinstance(getattr(module, "variance_epsilon", None), float) and not list(module.children()))


def _is_gated_mlp(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, name, None), nn.Module)
               for name in ("gate_proj", "up_proj", "down_proj", "act_fn"))


CANDIDATES = ((_is_norm, _fused_norm_forward, lambda m: m.weight.shape[0]),
              (_is_gated_mlp, _fused_mlp_forward, lambda m: _in_features(m.gate_proj)))


def _in_features(layer: nn.Module) -> int | None:
    base = getattr(layer, "base_layer", layer)
    return getattr(base, "in_features", None)


@torch.no_grad()
def _probe(module: nn.Module, fused, width: int) -> bool:
    """True when the fused forward gives the module's own output, bit for bit, in fp32 and bf16."""
    parameter = next(module.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    was_training = module.training
    module.eval()
    try:
        for dtype in _PROBE_DTYPES:
            x = torch.randn(2, 3, width, generator=generator).to(device=device, dtype=dtype)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                expected, got = module(x), fused(module, x)
            if not isinstance(expected, torch.Tensor) or expected.shape != got.shape or expected.dtype != got.dtype \
                    or not torch.equal(expected, got):
                return False
    except Exception:  # noqa: BLE001 - a module the probe cannot run is simply not swapped
        return False
    finally:
        module.train(was_training)
    return True


def use_fused_modules(model: nn.Module) -> list[str]:
    """Swap the forward of every RMSNorm and SwiGLU MLP of `model` that passes the probe; the names swapped."""
    swapped = []
    for name, module in model.named_modules():
        if hasattr(module, _ORIGINAL):
            continue
        for matches, fused, width_of in CANDIDATES:
            if not matches(module):
                continue
            width = width_of(module)
            if width and _probe(module, fused, width):
                setattr(module, _ORIGINAL, module.forward)
                module.forward = types.MethodType(fused, module)
                swapped.append(name)
            break
    return swapped


def restore_modules(model: nn.Module) -> int:
    """Give every swapped module its own forward back; the number restored."""
    restored = 0
    for module in model.modules():
        if hasattr(module, _ORIGINAL):
            del module.forward  # the instance attribute: the class's forward shows through again
            delattr(module, _ORIGINAL)
            restored += 1
    return restored
