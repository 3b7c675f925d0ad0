"""The same LoraConfig selects the same modules in lorakit and in PEFT, with the same r / alpha / scaling,
and leaves the same parameters trainable (names and counts), on four architectures."""

from __future__ import annotations

import peft
import pytest

import lorakit
from tests.interop.conftest import (
    ARCHS,
    Arch,
    adapter_layer_names,
    lora_settings,
    our_config,
    peft_config,
    trainable_names,
)


def targeting_options(arch: Arch) -> dict[str, dict]:
    """Option id -> LoraConfig fields, covering every way of choosing targets."""
    options = {
        "names": dict(target_modules=arch.names),
        "dotted-suffix": dict(target_modules=arch.suffixes),
        "full-names": dict(target_modules=arch.full_names),
        "regex": dict(target_modules=arch.regex),
        "all-linear": dict(target_modules="all-linear"),
        "ALL-LINEAR-uppercase": dict(target_modules="ALL-LINEAR"),
        "arch-default": dict(target_modules=None),
        "exclude-list": dict(target_modules="all-linear", exclude_modules=arch.exclude),
        "exclude-regex": dict(target_modules="all-linear", exclude_modules=arch.exclude_regex),
        "exclude-with-names": dict(target_modules=arch.names + arch.suffixes, exclude_modules=arch.exclude_regex),
        "layers-list+pattern": dict(target_modules=arch.names + arch.suffixes, layers_to_transform=[1],
                                    layers_pattern=arch.layers_pattern),
        "layers-int-no-pattern": dict(target_modules=arch.names, layers_to_transform=0),
        "layers-pattern-as-list": dict(target_modules=arch.names, layers_to_transform=[0],
                                       layers_pattern=[arch.layers_pattern]),
        "modules-to-save": dict(target_modules=arch.names, modules_to_save=arch.modules_to_save),
        "modules-to-save+all-linear": dict(target_modules="all-linear", modules_to_save=arch.modules_to_save),
        "rank-alpha-pattern": dict(target_modules="all-linear", r=4, lora_alpha=8, rank_pattern=arch.rank_pattern,
                                   alpha_pattern=arch.alpha_pattern),
        "rslora": dict(target_modules="all-linear", r=4, lora_alpha=16, use_rslora=True,
                       rank_pattern=arch.rank_pattern, alpha_pattern=arch.alpha_pattern),
        "bias-all": dict(target_modules=arch.names, bias="all"),
        "bias-lora-only": dict(target_modules=arch.suffixes, bias="lora_only"),
        "bias-lora-only+all-linear": dict(target_modules="all-linear", bias="lora_only"),
    }
    if arch.embedding:
        options["embedding"] = dict(target_modules=[arch.embedding] + arch.names)
    return options


def cases():
    for arch in ARCHS.values():
        for option_id, options in targeting_options(arch).items():
            yield pytest.param(arch, options, id=f"{arch.name}-{option_id}")


def build_both(arch: Arch, options: dict):
    theirs = peft.get_peft_model(arch.build(), peft_config(arch, **options))
    ours = lorakit.get_peft_model(arch.build(), our_config(arch, **options))
    return ours, theirs


@pytest.mark.parametrize("arch,options", list(cases()))
def test_same_targets_settings_and_trainable_parameters(arch, options):
    ours, theirs = build_both(arch, options)
    assert adapter_layer_names(ours), "the config targets nothing; the case proves nothing"
    assert adapter_layer_names(ours) == adapter_layer_names(theirs)
    assert lora_settings(ours) == lora_settings(theirs)  # r, lora_alpha, scaling per module
    assert trainable_names(ours) == trainable_names(theirs)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


@pytest.mark.parametrize("arch", [pytest.param(a, id=a.name) for a in ARCHS.values()])
def test_patterns_really_vary_rank_and_scaling(arch):
    """Guard for the pattern cases: they must give more than one (r, alpha) in the model."""
    ours, _ = build_both(arch, targeting_options(arch)["rank-alpha-pattern"])
    settings = {(r, alpha) for r, alpha, _ in lora_settings(ours).values()}
    assert len({r for r, _ in settings}) >= 2 and len({a for _, a in settings}) >= 2, settings


def test_seq_cls_head_trained_in_full_both_ways():
    """SEQ_CLS: both libraries add the classifier to modules_to_save on their own."""
    arch = ARCHS["bert"]
    ours, theirs = build_both(arch, dict(target_modules=arch.names))
    head = {n for n in trainable_names(theirs) if ".classifier." in n}
    assert head and head <= trainable_names(ours)
