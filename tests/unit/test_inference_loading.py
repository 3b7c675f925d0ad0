"""The adapter loader shared by generate, eval, chat, merge (and a server): refuses NaN/inf weights, and reads a
pickle-only adapter only when asked to."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit import LoraConfig, get_peft_model
from lorakit.models.adapters import load_adapter_for_inference, nonfinite_tensors
from tests.tiny import tiny_llama


@pytest.fixture
def adapter_dir(tmp_path):
    torch.manual_seed(0)
    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(tiny_llama(), config).save_pretrained(str(tmp_path / "adapter"))
    return tmp_path / "adapter"


def test_a_clean_adapter_loads(adapter_dir):
    model = load_adapter_for_inference(tiny_llama(), str(adapter_dir))
    assert model.active_adapter == "default"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_weights_are_refused_naming_the_tensor(adapter_dir, bad):
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    name = sorted(weights)[0]
    weights[name][0, 0] = bad
    save_file(weights, adapter_dir / "adapter_model.safetensors")
    assert nonfinite_tensors(weights) == [(name, 1, weights[name].numel())]
    with pytest.raises(ValueError, match=rf"holds NaN/inf values in 1 of its {len(weights)} tensors \(e\.g\. "
                                         rf"{name.replace('.', '[.]')}: 1 of"):
        load_adapter_for_inference(tiny_llama(), str(adapter_dir))


def test_a_pickle_only_adapter_needs_consent(adapter_dir):
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    (adapter_dir / "adapter_model.safetensors").unlink()
    torch.save(weights, adapter_dir / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"holds only adapter_model\.bin, a pickle file.*--allow-pickle"):
        load_adapter_for_inference(tiny_llama(), str(adapter_dir))
    assert load_adapter_for_inference(tiny_llama(), str(adapter_dir), allow_pickle=True) is not None
