"""Corners of PEFT's behaviour that lorakit must reproduce for the same config (or file) to mean the same model.

Each test names the PEFT 0.21 function whose behaviour it pins down.
"""

from __future__ import annotations

import peft
import pytest
import torch

import lorakit
from tests.interop.conftest import (
    ARCHS,
    adapter_layer_names,
    assert_same_logits,
    build_peft,
    logits,
    our_config,
    peft_config,
    trainable_names,
)

LLAMA = ARCHS["llama"]


def build_both(arch, options):
    theirs = peft.get_peft_model(arch.build(), peft_config(arch, **options))
    ours = lorakit.get_peft_model(arch.build(), our_config(arch, **options))
    return ours, theirs


def wrapper_names(model) -> set[str]:
    return {n for n, m in model.named_modules() if type(m).__name__ == "ModulesToSaveWrapper"}


def test_modules_to_save_matches_a_plain_name_ending():
    """peft.utils.other._set_trainable matches `key.endswith(target_key)` with no dot boundary, so
    modules_to_save=["norm"] also trains every `input_layernorm` / `post_attention_layernorm` of Llama."""
    ours, theirs = build_both(LLAMA, dict(target_modules=LLAMA.names, modules_to_save=["norm"]))
    assert "base_model.model.model.layers.0.input_layernorm" in wrapper_names(theirs)
    assert wrapper_names(ours) == wrapper_names(theirs)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_peft_file_with_plain_name_modules_to_save_loads(tmp_path):
    """The consequence for files: PEFT saves a copy of every layer norm, which lorakit must accept."""
    theirs = build_peft(LLAMA, {"default": dict(target_modules=LLAMA.names, modules_to_save=["norm"])})
    theirs.save_pretrained(tmp_path)
    ours = lorakit.PeftModel.from_pretrained(LLAMA.build(), str(tmp_path)).eval()
    inputs = LLAMA.inputs()
    assert_same_logits(logits(ours, inputs), logits(theirs, inputs))
    # The layer-norm copies belong to the adapter: without it, the model is the base model again. (Loading them
    # into the base model's own norms would give the right logits above but change the base model for good.)
    with ours.disable_adapter(), theirs.disable_adapter():
        assert_same_logits(logits(ours, inputs), logits(theirs, inputs))
        assert_same_logits(logits(ours, inputs), logits(LLAMA.build(), inputs))


def test_layers_to_transform_ignores_exact_full_names():
    """peft.tuners.tuners_utils.check_target_module_exists: a module named exactly in target_modules is taken
    before (and without) the layers_to_transform filter, which only applies to suffix matches."""
    options = dict(target_modules=["model.layers.1.self_attn.o_proj", "q_proj"], layers_to_transform=[0])
    ours, theirs = build_both(LLAMA, options)
    assert "base_model.model.model.layers.1.self_attn.o_proj" in adapter_layer_names(theirs)
    assert adapter_layer_names(ours) == adapter_layer_names(theirs)


def test_empty_layers_to_transform_selects_every_layer():
    """check_target_module_exists: `layers_to_transform=[]` means no layer filter (not "no layer")."""
    ours, theirs = build_both(LLAMA, dict(target_modules=LLAMA.names, layers_to_transform=[]))
    assert adapter_layer_names(ours) == adapter_layer_names(theirs)


REJECTED = {
    "layers-with-regex": dict(target_modules=LLAMA.regex, layers_to_transform=[0]),
    "layers-with-all-linear": dict(target_modules="all-linear", layers_to_transform=[1]),
    "pattern-with-regex": dict(target_modules=LLAMA.regex, layers_pattern="layers"),
    "pattern-without-layers": dict(target_modules=LLAMA.names, layers_pattern="layers"),
}


@pytest.mark.parametrize("options", REJECTED.values(), ids=list(REJECTED))
def test_layer_selection_peft_rejects_is_rejected(options):
    """peft.LoraConfig.__post_init__ raises for layers_to_transform / layers_pattern with a string target
    (regex or "all-linear") and for layers_pattern alone; lorakit ignoring them silently would train other
    layers than the user asked for."""
    with pytest.raises(ValueError):
        peft_config(LLAMA, **options)
    with pytest.raises(ValueError, match="layers_"):
        our_config(LLAMA, **options)


def test_adapter_layer_exposes_base_weight():
    """PEFT's BaseTunerLayer has `weight` / `bias` properties (the base layer's). transformers code reads them
    on whatever sits in the model: T5's feed-forward checks `self.wo.weight.dtype` in forward, so T5 with LoRA
    on `wo` (e.g. all-linear) only runs if the adapter layer has `.weight`."""
    arch = ARCHS["t5"]
    ours, theirs = build_both(arch, dict(target_modules=["wo"]))
    layer = ours.get_base_model().encoder.block[0].layer[1].DenseReluDense.wo
    assert layer.weight is layer.base_layer.weight
    inputs = arch.inputs()
    assert_same_logits(logits(ours, inputs), logits(theirs, inputs))  # B = 0: both equal the base model


def test_peft_bias_all_file_with_modules_to_save_loads(tmp_path):
    """With bias="all", PEFT's file also holds `classifier.modules_to_save.bias` and
    `classifier.original_module.bias` (its `"bias" in key` filter catches the wrapper's internals). lorakit must
    load such a file: these duplicate `classifier.bias` (the trained copy) and the frozen original."""
    arch = ARCHS["bert"]
    theirs = build_peft(arch, {"default": dict(target_modules=arch.names, bias="all")})
    theirs.save_pretrained(tmp_path)
    ours = lorakit.PeftModel.from_pretrained(arch.build(), str(tmp_path)).eval()
    inputs = arch.inputs()
    assert_same_logits(logits(ours, inputs), logits(theirs, inputs))


@pytest.mark.parametrize("arch", [pytest.param(a, id=a.name) for a in ARCHS.values()])
def test_second_all_linear_adapter_on_wrapped_model(arch):
    """_maybe_include_all_linear_layers counts existing LoRA layers as linear: a second "all-linear" adapter
    goes onto the already wrapped layers too, and not into the adapters' own lora_A / lora_B."""
    ours, theirs = build_both(arch, dict(target_modules=arch.names))
    torch.manual_seed(0)
    ours.add_adapter("other", our_config(arch, target_modules="all-linear", r=2))
    theirs.add_adapter("other", peft_config(arch, target_modules="all-linear", r=2))
    assert adapter_layer_names(ours) == adapter_layer_names(theirs)
    ours.set_adapter("other")
    theirs.set_adapter("other")
    assert trainable_names(ours) == trainable_names(theirs)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


@pytest.mark.parametrize("arch", [pytest.param(a, id=a.name) for a in ARCHS.values()])
def test_loading_trainable_or_frozen(arch, tmp_path):
    """from_pretrained(is_trainable=True) leaves the same parameters trainable in both libraries; by default
    nothing is trainable in lorakit. (PEFT 0.21 leaves bias="lora_only" biases trainable even then, which
    lorakit does not copy.)"""
    options = dict(target_modules=arch.names, modules_to_save=arch.modules_to_save, bias="lora_only")
    build_peft(arch, {"default": options}).save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(arch.build(), str(tmp_path), is_trainable=True)
    ours = lorakit.PeftModel.from_pretrained(arch.build(), str(tmp_path), is_trainable=True)
    assert trainable_names(ours) and trainable_names(ours) == trainable_names(theirs)
    frozen = lorakit.PeftModel.from_pretrained(arch.build(), str(tmp_path))
    assert not trainable_names(frozen)
