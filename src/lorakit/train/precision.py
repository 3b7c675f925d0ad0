"""The numeric precision of a training run: `train.bf16` = auto (default) | true | false.

- false: fp32 everywhere, the exact path (bit-for-bit comparisons with PEFT fp32, DDP/FSDP equalities).
- true: bf16 compute with fp32 master weights. In adapter runs the frozen weights are stored in bf16 (cast once,
  halving their memory and sparing autocast a cast per use), except those a training hook rewrites (ReLoRA,
  Delta-LoRA merge into them in fp32); the trained tensors stay fp32, frozen adapter tensors too (LoRA-FA's A),
  and so does the optimizer state. Forward and backward run under bf16 autocast, which also covers modules that
  keep fp32 weights; the loss is summed in fp32. Full and freeze runs keep every weight in fp32 (LISA unfreezes
  blocks as it goes) and use autocast alone. Evaluation during and after training runs under the same autocast.
- auto: true where bf16 matmuls are fast (a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX: ~3x fp32 on this
  project's EPYC), false elsewhere (bf16 emulated in software is slower than fp32).

When and what is stored in bf16 (adapter runs):
1. The model is loaded as the run says (fp32 by default) and the adapter injected: an init that rewrites the base
   (PiSSA, OLoRA) computes the residual W0 - s B A from the fp32 weights, in fp32. A bf16 checkpoint's weights,
   whose fp32 copies step 2 would round back to the same values, are loaded as stored instead (views of the
   mapped file; models/stored_bf16.py, train/setup.py load_training_model): step 2 then counts the frozen ones as
   stored and gives fp32 to the others; adapters and inits compute in fp32 from the same values either way.
2. Then the frozen weights, residuals included, are cast to bf16 (store_frozen_weights_in_bf16): the run trains
   against bf16(W0) or bf16(W0 - s B A). Checkpoints and the saved adapter hold only fp32 trained tensors, so a
   resume casts the same fp32 values the same way (bit-exact), and a reload (`lorakit eval/generate/merge`,
   PeftModel.from_pretrained) on the fp32 base re-derives the fp32 residual: the trained model's outputs to within
   bf16 rounding of the frozen weights.
3. When the run ends (finished, interrupted, or before merging the adapter into a model that training hooks
   changed), the frozen weights get their loaded dtype back (restore_stored_dtypes; not at the end of a run whose
   caller takes no model back, `lorakit train`: run_training(return_model=False)), holding the bf16 values the
   run trained against (exactly representable). The model a run returns is therefore an ordinary model in the
   dtype it was loaded in: it runs without autocast, merges in fp32 and saves in one dtype, as an fp32 run's.

A run with bf16 matches the fp32 run to within bf16 rounding (docs/performance.md shows the loss curves).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from lorakit.file_pages import FileMappings, cast_in_place
from lorakit.state import adapter_holders

BF16_CHOICES = ("auto", True, False)


def check_bf16_option(value) -> None:
    if value not in BF16_CHOICES or isinstance(value, (int, float)) and not isinstance(value, bool):
        raise ValueError(f"train.bf16 must be auto, true or false, got {value!r}")


def fast_bf16(device: torch.device) -> bool:
    """True when this device multiplies bf16 matrices natively (faster than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None),
                  getattr(torch.cpu, "_is_amx_tile_supported", None))
        return torch.backends.mkldnn.is_available() and any(callable(p) and p() for p in probes)
    return False


def resolve_bf16(option, device: torch.device) -> bool:
    """The bf16 option as a yes/no for this device."""
    check_bf16_option(option)
    return fast_bf16(device) if option == "auto" else bool(option)


def autocast(device: torch.device, bf16: bool):
    """The context training and evaluation compute under."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@torch.no_grad()
def store_frozen_weights_in_bf16(model: nn.Module, keep: set[str] = frozenset(),
                                 loaded_dtype: torch.dtype | None = None) -> dict[str, torch.dtype]:
    """Cast every frozen parameter of `model` wider than bf16 (fp32) to bf16 in place, except those named in
    `keep` (and any sharing storage with a trainable one). Returns {name: dtype before} of those cast, for
    restore_stored_dtypes (a tied parameter appears once: it is one object). The pages of a weight that was a view
    of the memory-mapped checkpoint are given back as it is cast (file_pages.py), so that the run does not
    hold the whole file beside the bf16 copies.

    loaded_dtype (fp32) says that the model's bf16 parameters are a bf16 checkpoint's weights as stored
    (models/stored_bf16.py) standing for the `loaded_dtype` model the run asked for: a frozen one is already what
    the cast would give (recorded as {name: loaded_dtype}), and every other one (trained, kept, sharing a trained
    one's storage) gets `loaded_dtype` now, as the run's load would have given it (bf16 values are exact in it)."""
    trainable = {p.untyped_storage().data_ptr() for p in model.parameters() if p.requires_grad}
    # adapter tensors stay as they are, frozen ones too (LoRA-FA's A is saved in the adapter file in fp32)
    adapter_tensors = {id(p) for _, holder in adapter_holders(model)
                       for name, p in holder.named_parameters() if not name.startswith("base_layer.")}
    stored, mappings, seen = {}, FileMappings.read(), set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:  # a tied parameter: one object, cast (or recorded) once
            continue
        seen.add(id(param))
        stays = (param.requires_grad or name in keep or id(param) in adapter_tensors or not param.is_floating_point()
                 or param.untyped_storage().data_ptr() in trainable)
        if loaded_dtype is not None and param.dtype == torch.bfloat16:
            if stays:
                cast_in_place(param, loaded_dtype, mappings)
            else:
                stored[name] = loaded_dtype
            continue
        # only wider types gain (fp32: half the memory); fp16 weights keep their finer mantissa in the same bytes
        if stays or param.element_size() <= 2:
            continue
        stored[name] = param.dtype
        # tied parameters are one object: cast once, seen by both; a weight read from the mapped checkpoint gives
        # its pages back now
        cast_in_place(param, torch.bfloat16, mappings)
    return stored


@torch.no_grad()
def restore_stored_dtypes(model: nn.Module, stored: dict[str, torch.dtype]) -> None:
    """Give the parameters store_frozen_weights_in_bf16 cast their earlier dtype back, in place (`model` named as
    then). The values stay the bf16 ones the run trained against (every bf16 value is exact in fp32: only the
    storage changes). Entries are removed from `stored` as they are restored, so a second call does nothing.
    Sharded parameters (FSDP) stay bf16: their storage belongs to the sharding."""
    params, mappings = dict(model.named_parameters(remove_duplicate=False)), FileMappings.read()
    for name in list(stored):
        param = params.get(name)
        if param is not None and not hasattr(param, "full_tensor"):
            cast_in_place(param, stored[name], mappings)  # a weight kept as stored in a bf16 checkpoint: its pages go
        del stored[name]
