"""VeRA files cross between lorakit and PEFT in both directions (with and without saved projections): the same
projections from the same seed, the same file keys and shapes, the same logits, merged or not."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file

import lorakit
from tests.interop.conftest import (
    ARCHS,
    Arch,
    arch_params,
    assert_adapter_acts,
    assert_same_logits,
    base_logits,
    logits,
    perturb_trainable,
)

WEIGHTS = "adapter_model.safetensors"
VERA_ARCHS = arch_params(lambda a: a.name in ("llama", "gpt2", "bert"))


def vera_options(arch: Arch, **extra) -> dict:
    """All linear layers (of several shapes) with a small rank, plus the arch's own fields (GPT-2's fan_in_fan_out)."""
    return {"r": 16, "target_modules": arch.names + arch.suffixes, **arch.extra, **extra}


def peft_from_pretrained(arch: Arch, directory) -> peft.PeftModel:
    """PEFT loads the files with no warning about keys, but its expected notes on regenerated projections."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(arch.build(), str(directory))
    notes = [str(w.message) for w in caught if "key" in str(w.message).lower()
             and not str(w.message).startswith("Specified to not")]  # save_projection=False: "relying on the PRNG key"
    assert not notes, f"PEFT warned while loading lorakit's files: {notes}"
    return model.eval()


def build(arch: Arch, library, seed: int = 0, **options):
    """A VeRA model of `library` (peft or lorakit) with random, perturbed lambdas (init_weights=False)."""
    torch.manual_seed(seed)
    config = library.VeraConfig(task_type=arch.task_type, init_weights=False, **copy.deepcopy(options))
    model = library.get_peft_model(arch.build(), config)
    perturb_trainable(model, seed=100 + seed)
    return model.eval()


@pytest.mark.parametrize("arch", VERA_ARCHS)
def test_both_libraries_draw_the_same_projections_from_the_seed(arch):
    for seed in (0, 1234):
        options = vera_options(arch, projection_prng_key=seed)
        ours, theirs = build(arch, lorakit, **options), build(arch, peft, **options)
        for attr in ("vera_A", "vera_B"):
            assert torch.equal(getattr(ours.base_model, attr)["default"], getattr(theirs.base_model, attr)["default"])


@pytest.mark.parametrize("save_projection", [True, False], ids=["projections-saved", "projections-regenerated"])
@pytest.mark.parametrize("arch", VERA_ARCHS)
def test_peft_files_load_in_lorakit(arch, save_projection, tmp_path):
    theirs = build(arch, peft, **vera_options(arch, save_projection=save_projection))
    theirs.save_pretrained(tmp_path)
    inputs = arch.inputs()
    ours = lorakit.PeftModel.from_pretrained(arch.build(), str(tmp_path))
    expected = logits(theirs, inputs)
    assert_adapter_acts(expected, base_logits(arch, inputs))
    assert_same_logits(logits(ours, inputs), expected)


@pytest.mark.parametrize("save_projection", [True, False], ids=["projections-saved", "projections-regenerated"])
@pytest.mark.parametrize("arch", VERA_ARCHS)
def test_lorakit_files_load_in_peft_with_the_same_keys(arch, save_projection, tmp_path):
    options = vera_options(arch, save_projection=save_projection)
    ours = build(arch, lorakit, **options)
    ours.save_pretrained(tmp_path / "ours")
    build(arch, peft, **options).save_pretrained(tmp_path / "theirs")
    our_file, their_file = load_file(tmp_path / "ours" / WEIGHTS), load_file(tmp_path / "theirs" / WEIGHTS)
    assert {k: v.shape for k, v in our_file.items()} == {k: v.shape for k, v in their_file.items()}
    assert ("base_model.vera_A" in our_file) == save_projection
    theirs = peft_from_pretrained(arch, tmp_path / "ours")
    inputs = arch.inputs()
    expected = logits(ours, inputs)
    assert_adapter_acts(expected, base_logits(arch, inputs))
    assert_same_logits(logits(theirs, inputs), expected)


@pytest.mark.parametrize("arch", arch_params(lambda a: a.name in ("llama", "gpt2")))
def test_merged_weights_equal_peft_merged_weights(arch, tmp_path):
    theirs = build(arch, peft, **vera_options(arch))
    theirs.save_pretrained(tmp_path)
    ours = lorakit.PeftModel.from_pretrained(arch.build(), str(tmp_path))
    inputs = arch.inputs()
    ours_merged, theirs_merged = ours.merge_and_unload(), theirs.merge_and_unload()
    ours_weights, theirs_weights = ours_merged.state_dict(), theirs_merged.state_dict()
    assert ours_weights.keys() == theirs_weights.keys()
    for key in ours_weights:
        torch.testing.assert_close(ours_weights[key], theirs_weights[key], atol=1e-6, rtol=0, msg=key)
    assert_same_logits(logits(ours_merged, inputs), logits(theirs_merged, inputs))


def test_a_lorakit_default_llama_config_reads_as_peft_reads_it(tmp_path):
    """adapter_config.json of every VeRA field (defaults and set ones) reads back the same in PEFT."""
    arch = ARCHS["llama"]
    config = lorakit.VeraConfig(r=8, target_modules=["q_proj"], vera_dropout=0.1, d_initial=0.05,
                                projection_prng_key=9, bias="vera_only", layers_to_transform=[1], layers_pattern="layers",
                                task_type=arch.task_type)
    lorakit.get_peft_model(arch.build(), config).save_pretrained(tmp_path)
    theirs = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(theirs, peft.VeraConfig)
    for field in ("r", "vera_dropout", "d_initial", "projection_prng_key", "bias", "layers_to_transform",
                  "layers_pattern", "save_projection", "init_weights"):
        assert getattr(theirs, field) == getattr(config, field), field
