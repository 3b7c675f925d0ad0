"""add_weighted_adapter against PEFT: every combination type gives PEFT's adapter on the same source adapters.

The random ones (dare_*) draw their masks from torch's global generator in PEFT's order (layers in module order,
A's then B's, over the tensors in the base weight's layout), so with the same seed they equal PEFT's too. BERT is
left out: both its adapters train the classifier head, which PEFT (and lorakit) refuse to combine. (Adapter names
are words: PEFT's load_adapter counts as "missing" every absent key that contains the loaded adapter's name, and
a name like "b" is in every key, "base_model".)
"""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.methods.lora.arithmetic import COMBINATION_TYPES
from tests.interop.conftest import (
    arch_params,
    assert_adapter_acts,
    assert_same_logits,
    build_peft,
    logits,
    peft_load_adapter,
)

DENSITY = 0.5
WEIGHTS = "adapter_model.safetensors"


def sources(arch) -> dict[str, dict]:
    embedding = [arch.embedding] if arch.embedding else []
    return {"first": dict(target_modules=arch.names + embedding, r=4, lora_alpha=8, init_lora_weights=True),
            "second": dict(target_modules=arch.suffixes + arch.names[:1], r=4, lora_alpha=16, init_lora_weights=True)}


@pytest.fixture(scope="module", params=arch_params(lambda a: a.name != "bert"))
def pair(request, tmp_path_factory):
    """The same two source adapters in PEFT and in lorakit (loaded from PEFT's files)."""
    arch = request.param
    directory = tmp_path_factory.mktemp(f"arith-{arch.name}")
    build_peft(arch, sources(arch)).save_pretrained(directory)
    return arch, directory


def load_both(arch, directory):
    theirs = peft.PeftModel.from_pretrained(arch.build(), str(directory / "first"), adapter_name="first")
    peft_load_adapter(theirs, directory / "second", "second")
    ours = lorakit.PeftModel.from_pretrained(arch.build(), str(directory / "first"), adapter_name="first")
    ours.load_adapter(str(directory / "second"), adapter_name="second")
    return theirs.eval(), ours.eval()


@pytest.mark.parametrize("combination_type", list(COMBINATION_TYPES))
def test_each_combination_type_equals_peft(pair, combination_type, tmp_path):
    arch, directory = pair
    theirs, ours = load_both(arch, directory)
    options = dict(combination_type=combination_type)
    if combination_type not in ("svd", "linear", "cat"):
        options["density"] = DENSITY
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(11)
        theirs.add_weighted_adapter(["first", "second"], [0.8, -0.5], "mix", **options)
        torch.manual_seed(11)
        ours.add_weighted_adapter(["first", "second"], [0.8, -0.5], "mix", **options)
    theirs.set_adapter("mix")
    ours.set_adapter("mix")
    inputs = arch.inputs()
    expected = logits(theirs, inputs)
    ours.set_adapter("first")
    assert_adapter_acts(expected, logits(ours, inputs))  # the combination is not just the first adapter
    ours.set_adapter("mix")
    # SVDs of the same matrix may differ in the last bits between the two libraries' orders of operations
    assert_same_logits(logits(ours, inputs), expected, atol=1e-5 if "svd" in combination_type else 0)
    # our file of the combined adapter loads in PEFT with the same outputs
    ours.save_pretrained(str(tmp_path), selected_adapters=["mix"])
    loaded = peft.PeftModel.from_pretrained(arch.build(), str(tmp_path / "mix")).eval()
    assert_same_logits(logits(loaded, inputs), logits(ours, inputs))
    if "svd" not in combination_type:  # entry by entry, the factor tensors are PEFT's
        held = peft.get_peft_model_state_dict(theirs, adapter_name="mix")
        for key, tensor in load_file(tmp_path / "mix" / WEIGHTS).items():
            assert torch.equal(held[key], tensor), key


@pytest.mark.parametrize("arch", arch_params(lambda a: a.name == "llama"))
def test_rslora_sources_combine_exactly_unlike_peft(arch, tmp_path):
    """PEFT keeps use_rslora for the combined adapter, whose lora_alpha = r then scales it by sqrt(r) instead of 1;
    lorakit's combined adapter has scaling 1, so `cat` is exactly the weighted sum of the updates."""
    options = {name: {**opts, "use_rslora": True} for name, opts in sources(arch).items()}
    build_peft(arch, options).save_pretrained(tmp_path)
    theirs, ours = load_both(arch, tmp_path)
    theirs.add_weighted_adapter(["first", "second"], [1.0, 1.0], "mix", combination_type="cat")
    ours.add_weighted_adapter(["first", "second"], [1.0, 1.0], "mix", combination_type="cat")
    path = "base_model.model.model.layers.0.self_attn.q_proj"
    their_layer, our_layer = theirs.get_submodule(path), ours.get_submodule(path)
    want = their_layer.get_delta_weight("first") + their_layer.get_delta_weight("second")
    torch.testing.assert_close(our_layer.delta_weight("mix"), want, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(their_layer.get_delta_weight("mix"), want, atol=1e-3)


@pytest.mark.parametrize("arch", arch_params(lambda a: a.name == "llama"))
def test_linear_with_rank_patterns_equals_peft(arch, tmp_path):
    """Sources with rank_pattern: a factor-wise combination works layer by layer at the layer's rank (PEFT shrinks
    that layer's tensors, lorakit pads the new adapter's rank with zeros: the same outputs)."""
    options = {name: {**opts, "r": 4, "rank_pattern": {"q_proj": 2}} for name, opts in sources(arch).items()}
    build_peft(arch, options).save_pretrained(tmp_path)
    theirs, ours = load_both(arch, tmp_path)
    for model in (theirs, ours):
        model.add_weighted_adapter(["first", "second"], [0.5, 1.5], "mix", combination_type="linear")
        model.set_adapter("mix")
    inputs = arch.inputs()
    assert_same_logits(logits(ours, inputs), logits(theirs, inputs))
