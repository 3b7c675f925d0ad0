"""A batch whose rows use different adapters (`adapter_names=`) gives the same logits and the same greedy
generations in lorakit as in PEFT, which takes the same argument."""

from __future__ import annotations

import pytest
import torch

import lorakit
from tests.interop.conftest import (
    Arch,
    arch_params,
    assert_adapter_acts,
    assert_same_logits,
    build_peft,
    logits,
)

# Row i uses ROWS[i]; "__base__" is the model without adapters. Four rows so that one adapter has two.
ROWS = ["default", "__base__", "other", "default"]
# PEFT mixes batches through modules_to_save only for Linear/Embedding/Conv copies: a head, not a norm.
# (BERT's classifier comes by itself with SEQ_CLS; GPT-2's and T5's heads are tied to the embedding.)
MIXED_HEADS = {"llama": ["lm_head"]}


def two_adapters(arch: Arch) -> dict[str, dict]:
    heads = MIXED_HEADS.get(arch.name)
    return {
        "default": dict(target_modules=arch.names, modules_to_save=heads),
        "other": dict(target_modules=arch.suffixes + arch.names[:1], r=4, lora_alpha=16, modules_to_save=heads),
    }


@pytest.fixture
def both(request, tmp_path):
    """(lorakit model, PEFT model) holding the same two adapters, PEFT's files loaded by lorakit."""
    arch = request.param
    theirs = build_peft(arch, two_adapters(arch))
    theirs.save_pretrained(tmp_path)
    ours = lorakit.PeftModel.from_pretrained(arch.build(), str(tmp_path))
    ours.load_adapter(str(tmp_path / "other"), adapter_name="other")
    return arch, ours.eval(), theirs


@pytest.mark.parametrize("both", arch_params(), indirect=True)
def test_mixed_batch_logits_match_peft(both):
    arch, ours, theirs = both
    inputs = arch.inputs(batch=len(ROWS))
    expected = logits(theirs, inputs, adapter_names=ROWS)
    assert_same_logits(logits(ours, inputs, adapter_names=ROWS), expected)
    # guards: the rows really differ (adapter vs base, and between the two adapters)
    assert_adapter_acts(expected[0], logits(arch.build(), inputs)[0])
    with torch.no_grad():
        theirs.set_adapter("other")
        assert_adapter_acts(logits(theirs, inputs)[0], expected[0])


@pytest.mark.parametrize("both", arch_params(lambda a: a.generates), indirect=True)
def test_mixed_batch_greedy_generation_matches_peft(both):
    arch, ours, theirs = both
    inputs = {k: v for k, v in arch.inputs(batch=len(ROWS)).items() if k != "decoder_input_ids"}
    settings = dict(max_new_tokens=6, do_sample=False, num_beams=1, adapter_names=ROWS)
    with torch.no_grad():
        expected = theirs.generate(**inputs, **settings)
        got = ours.generate(**inputs, **settings)
    assert torch.equal(got, expected)
    assert not torch.equal(expected[0], expected[1]), "adapter and base rows generated the same tokens"
