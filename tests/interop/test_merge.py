"""merge_and_unload gives the same plain transformers model in lorakit as in PEFT (same adapter, via files)."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.adapter_layer import AdapterHolder
from tests.interop.conftest import ARCHS, Arch, assert_same_logits, build_peft, logits

MERGE_ATOL = 1e-6


def merge_options(arch: Arch) -> dict[str, dict]:
    options = {
        "names": dict(target_modules=arch.names),
        "rich": dict(target_modules="all-linear", r=4, lora_alpha=8, rank_pattern=arch.rank_pattern,
                     alpha_pattern=arch.alpha_pattern, use_rslora=True, modules_to_save=arch.modules_to_save),
        "bias-lora-only": dict(target_modules=arch.suffixes, bias="lora_only"),
    }
    if arch.embedding:
        options["embedding"] = dict(target_modules=[arch.embedding] + arch.names)
    return options


def cases():
    for arch in ARCHS.values():
        for option_id, options in merge_options(arch).items():
            yield pytest.param(arch, options, id=f"{arch.name}-{option_id}")


def assert_same_weights(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert set(ours_sd) == set(theirs_sd)
    for key, value in theirs_sd.items():
        torch.testing.assert_close(ours_sd[key], value, atol=MERGE_ATOL, rtol=0, msg=lambda m: f"{key}: {m}")


def assert_weights_changed(merged: torch.nn.Module, arch: Arch) -> None:
    """Guard: merging must have changed some base weight, or the comparison proves nothing."""
    base = arch.build().state_dict()
    assert any(not torch.allclose(v, base[k]) for k, v in merged.state_dict().items() if k in base)


@pytest.mark.parametrize("arch,options", list(cases()))
def test_merge_and_unload_matches_peft(arch, options, tmp_path):
    theirs = build_peft(arch, {"default": options})
    theirs.save_pretrained(tmp_path)
    ours = lorakit.PeftModel.from_pretrained(arch.build(), str(tmp_path))
    theirs_merged, ours_merged = theirs.merge_and_unload(), ours.merge_and_unload()
    assert type(ours_merged) is type(theirs_merged)
    assert not any(isinstance(m, AdapterHolder) for m in ours_merged.modules())
    assert_weights_changed(ours_merged, arch)
    assert_same_weights(ours_merged, theirs_merged)
    # Not compared with the unmerged logits: merging LoRA into an embedding tied to the output head (GPT-2's wte)
    # changes the head too, in both libraries.
    inputs = arch.inputs()
    assert_same_logits(logits(ours_merged.eval(), inputs), logits(theirs_merged.eval(), inputs))


@pytest.mark.parametrize("arch", [pytest.param(a, id=a.name) for a in ARCHS.values()])
def test_merging_two_adapters_matches_peft(arch, tmp_path):
    """merge_and_unload(adapter_names=[a, b]) adds both updates, in both libraries."""
    other = dict(target_modules=arch.suffixes + arch.names[:1], r=4, lora_alpha=16)
    theirs = build_peft(arch, {"default": dict(target_modules=arch.names), "other": other})
    theirs.save_pretrained(tmp_path)
    ours = lorakit.PeftModel.from_pretrained(arch.build(), str(tmp_path))
    ours.load_adapter(str(tmp_path / "other"), adapter_name="other")
    names = ["default", "other"]
    assert_same_weights(ours.merge_and_unload(adapter_names=names), theirs.merge_and_unload(adapter_names=names))
