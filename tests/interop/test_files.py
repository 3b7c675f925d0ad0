"""Adapter files cross between lorakit and PEFT in both directions: same logits after loading, same keys and
shapes in the safetensors files, and each library reads the other's adapter_config.json."""

from __future__ import annotations

import json
import re

import peft
import pytest
from safetensors.torch import load_file

import lorakit
from tests.interop.conftest import (
    ARCHS,
    Arch,
    arch_params,
    assert_adapter_acts,
    assert_same_logits,
    base_logits,
    build_ours,
    build_peft,
    logits,
    peft_from_pretrained,
    peft_load_adapter,
)

WEIGHTS = "adapter_model.safetensors"


def file_options(arch: Arch) -> dict[str, dict]:
    """Configs whose files are exchanged: plain, everything at once, all biases, and LoRA on the embedding."""
    options = {
        "names": dict(target_modules=arch.names),
        "rich": dict(target_modules="all-linear", r=4, lora_alpha=8, rank_pattern=arch.rank_pattern,
                     alpha_pattern=arch.alpha_pattern, use_rslora=True, modules_to_save=arch.modules_to_save,
                     bias="lora_only"),
        "bias-all": dict(target_modules=arch.suffixes, bias="all"),
        "default-targets": dict(target_modules=None, lora_dropout=0.1),  # dropout is off in eval mode
    }
    if arch.embedding:
        options["embedding"] = dict(target_modules=[arch.embedding] + arch.names)
    return options


def cases():
    for arch in ARCHS.values():
        for option_id, options in file_options(arch).items():
            yield pytest.param(arch, options, id=f"{arch.name}-{option_id}")


# A second adapter with other targets and rank, overlapping the first one on some modules.
def second_adapter(arch: Arch) -> dict:
    return dict(target_modules=arch.suffixes + arch.names[:1], r=4, lora_alpha=16)


@pytest.mark.parametrize("arch,options", list(cases()))
def test_peft_files_load_in_lorakit(arch, options, tmp_path):
    theirs = build_peft(arch, {"default": options})
    theirs.save_pretrained(tmp_path)
    ours = lorakit.PeftModel.from_pretrained(arch.build(), str(tmp_path)).eval()
    inputs = arch.inputs()
    expected = logits(theirs, inputs)
    assert_adapter_acts(expected, base_logits(arch, inputs))
    assert_same_logits(logits(ours, inputs), expected)


@pytest.mark.parametrize("arch,options", list(cases()))
def test_lorakit_files_load_in_peft(arch, options, tmp_path):
    ours = build_ours(arch, {"default": options})
    ours.save_pretrained(str(tmp_path))
    theirs = peft_from_pretrained(arch, tmp_path)
    inputs = arch.inputs()
    expected = logits(ours, inputs)
    assert_adapter_acts(expected, base_logits(arch, inputs))
    assert_same_logits(logits(theirs, inputs), expected)
    # PEFT ignores unexpected keys in from_pretrained: check that what it holds is exactly our file
    ours_file = load_file(tmp_path / WEIGHTS)
    held = peft.get_peft_model_state_dict(theirs)
    assert set(ours_file) <= set(held)
    for key, tensor in ours_file.items():
        assert held[key].shape == tensor.shape and (held[key] == tensor).all(), key


# Keys only PEFT writes, by design. Each is checked to be one of these, nothing else may differ:
# - the full base embedding when a layer named like PEFT's EMBEDDING_LAYER_NAMES is targeted
#   (save_embedding_layers="auto", for resized vocabularies); lorakit reads these keys but does not write them;
# - with bias="all", the biases inside a modules_to_save wrapper (`classifier.modules_to_save.bias`,
#   `classifier.original_module.bias`): PEFT's `"bias" in key` filter catches them; the trained copy's bias
#   is saved as `classifier.bias` in both files anyway.
PEFT_ONLY_KEYS = (r".*\.(embed_tokens|lm_head)\.base_layer\.weight", r".*\.(modules_to_save|original_module)\.bias")


@pytest.mark.parametrize("arch,options", list(cases()))
def test_same_keys_and_shapes_in_files(arch, options, tmp_path):
    build_peft(arch, {"default": options}).save_pretrained(tmp_path / "peft")
    build_ours(arch, {"default": options}).save_pretrained(str(tmp_path / "ours"))
    theirs, ours = load_file(tmp_path / "peft" / WEIGHTS), load_file(tmp_path / "ours" / WEIGHTS)
    peft_only = {k for k in theirs if k not in ours and any(re.fullmatch(p, k) for p in PEFT_ONLY_KEYS)}
    assert set(ours) == set(theirs) - peft_only
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(theirs[k].shape) for k in ours}
    assert {k: v.dtype for k, v in ours.items()} == {k: theirs[k].dtype for k in ours}


CONFIG_FIELDS = ("r", "lora_alpha", "lora_dropout", "bias", "use_rslora", "fan_in_fan_out", "init_lora_weights",
                 "task_type", "rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern",
                 "target_modules", "exclude_modules", "modules_to_save")


def comparable(config) -> dict:
    """The fields both libraries define, with lists and sets as sets (PEFT turns target lists into sets)."""
    out = {}
    for name in CONFIG_FIELDS:
        value = getattr(config, name)
        out[name] = set(value) if isinstance(value, (list, set, tuple)) else value
    out["peft_type"] = str(getattr(config.peft_type, "value", config.peft_type))
    out["task_type"] = str(getattr(out["task_type"], "value", out["task_type"]))
    return out


@pytest.mark.parametrize("arch,options", list(cases()))
def test_configs_load_across(arch, options, tmp_path):
    build_peft(arch, {"default": options}).save_pretrained(tmp_path / "peft")
    build_ours(arch, {"default": options}).save_pretrained(str(tmp_path / "ours"))
    ours_read_by_peft = peft.LoraConfig.from_pretrained(str(tmp_path / "ours"))
    assert comparable(ours_read_by_peft) == comparable(lorakit.LoraConfig.from_pretrained(str(tmp_path / "ours")))
    peft_read_by_ours = lorakit.LoraConfig.from_pretrained(str(tmp_path / "peft"))
    assert comparable(peft_read_by_ours) == comparable(peft.LoraConfig.from_pretrained(str(tmp_path / "peft")))
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["peft_type"] == "LORA"


@pytest.mark.parametrize("arch", arch_params())
def test_second_peft_adapter_loads_and_switches(arch, tmp_path):
    """PEFT saves "default" in dir/ and any other adapter in dir/<name>/; lorakit loads both and switches."""
    theirs = build_peft(arch, {"default": dict(target_modules=arch.names), "other": second_adapter(arch)})
    theirs.save_pretrained(tmp_path)
    assert (tmp_path / "other" / WEIGHTS).is_file()
    ours = lorakit.PeftModel.from_pretrained(arch.build(), str(tmp_path)).eval()
    ours.load_adapter(str(tmp_path / "other"), adapter_name="other")
    inputs = arch.inputs()
    for name in ("other", "default", "other"):  # switching back and forth
        theirs.set_adapter(name)
        ours.set_adapter(name)
        assert_same_logits(logits(ours, inputs), logits(theirs, inputs))
    theirs.set_adapter("default")
    assert_adapter_acts(logits(theirs, inputs), logits(ours, inputs))  # the two adapters really differ
    with ours.disable_adapter(), theirs.disable_adapter():
        assert_same_logits(logits(ours, inputs), base_logits(arch, inputs))
        assert_same_logits(logits(theirs, inputs), base_logits(arch, inputs))


@pytest.mark.parametrize("arch", arch_params())
def test_second_lorakit_adapter_loads_in_peft(arch, tmp_path):
    ours = build_ours(arch, {"default": dict(target_modules=arch.names), "other": second_adapter(arch)})
    ours.save_pretrained(str(tmp_path))
    assert (tmp_path / "other" / WEIGHTS).is_file()
    theirs = peft_from_pretrained(arch, tmp_path)
    peft_load_adapter(theirs, tmp_path / "other", "other")
    inputs = arch.inputs()
    for name in ("other", "default"):
        theirs.set_adapter(name)
        ours.set_adapter(name)
        assert_same_logits(logits(theirs, inputs), logits(ours, inputs))
