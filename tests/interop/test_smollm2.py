"""lorakit against PEFT on the real embedded SmolLM2-135M-Instruct: all-linear LoRA, files both ways.

Slow (loads a 135M model four times; converts the GGUF into the cache on the very first run, ~30 s).
"""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import lorakit

pytestmark = pytest.mark.slow

embedded = pytest.importorskip(
    "lorakit.models.embedded", reason="lorakit.models.embedded (the embedded-model loader) is not written yet"
)

ATOL = 1e-4  # fp32, but 30 layers of 576-wide sums: summation order shows at 1e-5
LORA = dict(task_type="CAUSAL_LM", target_modules="all-linear", r=8, lora_alpha=16, init_lora_weights=False)
# all-linear r=8 on SmolLM2-135M (30 layers, hidden 576, kv 192, mlp 1536): per layer
# q, o: 8*(576+576); k, v: 8*(576+192); gate, up, down: 8*(576+1536)  ->  81,408 * 30
EXPECTED_TRAINABLE = 2_442_240
SMOLLM2_PARAMETERS = 134_515_008


@pytest.fixture(scope="module")
def smollm2_path() -> str:
    try:
        return embedded.resolve_model_path("smollm2")
    except embedded.EmbeddedModelMissingError as err:
        pytest.skip(f"the embedded SmolLM2 wheel is not installed: {err}")


def load(path: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def logits(model, inputs) -> torch.Tensor:
    return model(**inputs).logits


def test_smollm2_all_linear_both_ways(smollm2_path, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    inputs = tokenizer(["The capital of France is"], return_tensors="pt")

    # PEFT -> lorakit
    torch.manual_seed(0)
    theirs = peft.get_peft_model(load(smollm2_path), peft.LoraConfig(**LORA)).eval()
    peft_counts = theirs.get_nb_trainable_parameters()
    theirs.save_pretrained(tmp_path / "peft")
    expected = logits(theirs, inputs)
    del theirs
    ours = lorakit.PeftModel.from_pretrained(load(smollm2_path), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(logits(ours, inputs), expected, atol=ATOL, rtol=0)
    with ours.disable_adapter():
        assert (logits(ours, inputs) - expected).abs().max() > 1e-2, "the adapter does not change the logits"
    del ours

    # lorakit -> PEFT
    torch.manual_seed(1)
    ours = lorakit.get_peft_model(load(smollm2_path), lorakit.LoraConfig(**LORA)).eval()
    assert ours.get_nb_trainable_parameters() == peft_counts
    assert peft_counts == (EXPECTED_TRAINABLE, SMOLLM2_PARAMETERS + EXPECTED_TRAINABLE)
    ours.save_pretrained(str(tmp_path / "ours"))
    expected = logits(ours, inputs)
    del ours
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(load(smollm2_path), str(tmp_path / "ours")).eval()
    assert not [str(w.message) for w in caught if "key" in str(w.message).lower()]
    torch.testing.assert_close(logits(theirs, inputs), expected, atol=ATOL, rtol=0)
