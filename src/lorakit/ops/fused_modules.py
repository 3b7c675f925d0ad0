"""Swap a model's RMSNorm and gated-MLP forwards for the fused kernels (rms_norm.py, swiglu.py) that keep less
for the backward, and Llama attention's for one whose rotary embedding runs in lorakit's kernel (rotary.py),
where they compute exactly what the module does.

    swapped = use_fused_modules(model)           # once, after the adapters are in; returns the module names
    with recompute_saved_tensors():              # around each training forward (ops/recompute.py)
        loss = ...

Which modules: any module with a 1-D `weight` and a float `variance_epsilon` (RMSNorm as Llama, Mistral, Qwen2,
Phi-3, SmolLM and most decoder models write it), and any module with `gate_proj`, `up_proj`, `down_proj` and an
`act_fn` (the SwiGLU MLP), and transformers' `LlamaAttention` itself (not a subclass: its forward is the one
`_fused_attention_forward` repeats, with `apply_rotary` for `apply_rotary_pos_emb`; other architectures' attention
differs in ways a short probe cannot see, such as sliding windows). Each candidate is probed before it is
swapped: its own forward and the fused one run on the same random input (drawn from a private generator: the
run's random state is untouched; eval mode: no dropout), in fp32 and bf16, and the swap happens only when the
outputs are equal bit for bit; an attention module is also probed on a decoding step through a KV cache (a forward
that missed the installed transformers' cache argument would decode from an empty cache). A norm written
differently (Gemma's `1 + weight`, a norm with an offset) or another activation fails the probe and keeps its own
forward; nothing is swapped on a model with none of them. The swap sets the module's `forward` attribute
(the class is untouched); `restore_modules(model)` takes it back.
"""

from __future__ import annotations

import functools
import types

import torch
from torch import nn
from transformers import DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaAttention, eager_attention_forward

from lorakit.cache_argument import cache_argument
from lorakit.ops.rms_norm import rms_norm
from lorakit.ops.rotary import apply_rotary
from lorakit.ops.swiglu import silu_mul

_ORIGINAL = "_lorakit_original_forward"
_PROBE_DTYPES = (torch.float32, torch.bfloat16)


def _fused_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _fused_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


def _fused_attention_forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                             cache=None, past_key_values=None, **kwargs):
    """LlamaAttention.forward with the rotary embedding in lorakit's kernel (ops/rotary.py). The KV cache comes as
    `cache` (transformers >= 5.24) or `past_key_values` (before)."""
    cache = past_key_values if cache is None else cache
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    query_states, key_states = apply_rotary(query_states, key_states, cos, sin)
    if cache is not None:
        key_states, value_states = cache.update(key_states, value_states, self.layer_idx)
    attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                eager_attention_forward)
    attn_output, attn_weights = attention_interface(
        self, query_states, key_states, value_states, attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **kwargs)
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    return self.o_proj(attn_output), attn_weights


def _is_llama_attention(module: nn.Module) -> bool:
    return isinstance(module, LlamaAttention) and type(module).forward is LlamaAttention.forward


def _attention_calls(module: nn.Module, x: torch.Tensor) -> list:
    """The probe's calls of an attention module on hidden states x, with random rotary cos / sin of x's dtype: the
    whole sequence, and a decoding step (the last token, after the others went into a KV cache), whose output
    differs unless the forward writes and reads the cache as the module's own does."""
    generator = torch.Generator().manual_seed(1)
    angles = torch.rand(*x.shape[:-1], module.head_dim, generator=generator).to(x.device) * 6.3
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    cache_keyword = cache_argument(type(module).forward)

    def decoding_step(forward):
        cache = DynamicCache()
        forward(x[:, :-1], (cos[:, :-1], sin[:, :-1]), None, **{cache_keyword: cache})
        return forward(x[:, -1:], (cos[:, -1:], sin[:, -1:]), None, **{cache_keyword: cache})

    return [lambda forward: forward(x, (cos, sin)), decoding_step]


def _is_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (isinstance(weight, torch.Tensor) and weight.dim() == 1 and weight.is_floating_point()
            and isinstance(getattr(module, "variance_epsilon", None), float) and not list(module.children()))


def _is_gated_mlp(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, name, None), nn.Module)
               for name in ("gate_proj", "up_proj", "down_proj", "act_fn"))


# (which modules, the fused forward, the probe input's width, the probe's calls on its input)
CANDIDATES = ((_is_norm, _fused_norm_forward, lambda m: m.weight.shape[0], None),
              (_is_gated_mlp, _fused_mlp_forward, lambda m: _in_features(m.gate_proj), None),
              (_is_llama_attention, _fused_attention_forward, lambda m: m.config.hidden_size, _attention_calls))


def _in_features(layer: nn.Module) -> int | None:
    base = getattr(layer, "base_layer", layer)
    return getattr(base, "in_features", None)


@torch.no_grad()
def _probe(module: nn.Module, fused, width: int, calls=None) -> bool:
    """True when the fused forward gives the module's own output, bit for bit, in fp32 and bf16. `calls` makes the
    calls from the random input, each a function of the forward to call (default: one call on the input alone);
    a tuple output compares its first."""
    parameter = next(module.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    was_training = module.training
    module.eval()
    try:
        for dtype in _PROBE_DTYPES:
            x = torch.randn(2, 3, width, generator=generator).to(device=device, dtype=dtype)
            for call in (calls(module, x) if calls else [lambda forward: forward(x)]):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                    expected, got = call(module), call(functools.partial(fused, module))
                if isinstance(expected, tuple) and isinstance(got, tuple):
                    expected, got = expected[0], got[0]
                if not isinstance(expected, torch.Tensor) or expected.shape != got.shape \
                        or expected.dtype != got.dtype or not torch.equal(expected, got):
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
        for matches, fused, width_of, calls in CANDIDATES:
            if not matches(module):
                continue
            width = width_of(module)
            if width and _probe(module, fused, width, calls):
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
