"""Adapter directories: format, layout of several adapters, and every way a file can be wrong."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit import LoraConfig, PeftModel, get_peft_model
from tests.tiny import tiny_gpt2, tiny_llama

IDS = torch.tensor([[5, 9, 30, 31, 40, 7]])


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path)
    return model, tmp_path


def test_files_use_peft_names_and_layout(saved, tmp_path):
    model, directory = saved
    assert sorted(os.listdir(directory)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    keys = sorted(load_file(directory / "adapter_model.safetensors"))
    assert keys[0] == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" and len(keys) == 8
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["inference_mode"] is True and config["r"] == 4
    model.add_adapter("second", LoraConfig(r=2, target_modules=["k_proj"]))
    model.save_pretrained(tmp_path / "both")
    assert os.path.isfile(tmp_path / "both" / "adapter_model.safetensors")
    assert os.path.isfile(tmp_path / "both" / "second" / "adapter_model.safetensors")


def test_loaded_adapter_is_frozen_unless_trainable(saved):
    _, directory = saved
    frozen = PeftModel.from_pretrained(tiny_llama(), str(directory))
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = PeftModel.from_pretrained(tiny_llama(), str(directory), is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == 2 * 2 * (4 * 32) + 2 * (4 * 32 + 16 * 4)


def test_load_adapter_adds_a_second_named_adapter(saved, tmp_path):
    model, directory = saved
    torch.manual_seed(5)
    other = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False))
    other.save_pretrained(tmp_path / "other")
    loaded = PeftModel.from_pretrained(tiny_llama(), str(directory))
    loaded.load_adapter(str(tmp_path / "other"), "other")
    assert loaded.active_adapter == "default"
    torch.testing.assert_close(loaded(input_ids=IDS).logits, model(input_ids=IDS).logits)
    loaded.set_adapter("other")
    torch.testing.assert_close(loaded(input_ids=IDS).logits, other(input_ids=IDS).logits)


def test_missing_directory_or_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "nope" / "x"))
    with pytest.raises(FileNotFoundError, match="holds no adapter_config.json"):
        PeftModel.from_pretrained(tiny_llama(), str(tmp_path))


def test_corrupt_config_json(saved):
    _, directory = saved
    (directory / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        PeftModel.from_pretrained(tiny_llama(), str(directory))


def test_config_for_unknown_method(saved):
    _, directory = saved
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "HYPER", "r": 2}))
    with pytest.raises(ValueError, match="Unknown adapter method 'HYPER'"):
        PeftModel.from_pretrained(tiny_llama(), str(directory))


def test_corrupt_or_missing_weights(saved):
    _, directory = saved
    (directory / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        PeftModel.from_pretrained(tiny_llama(), str(directory))
    os.remove(directory / "adapter_model.safetensors")
    with pytest.raises(FileNotFoundError, match="No adapter_model.safetensors"):
        PeftModel.from_pretrained(tiny_llama(), str(directory))


def test_pickle_weights_need_opt_in(saved):
    model, directory = saved
    tensors = load_file(directory / "adapter_model.safetensors")
    os.remove(directory / "adapter_model.safetensors")
    torch.save(tensors, directory / "adapter_model.bin")
    with pytest.raises(ValueError, match="allow_pickle=True"):
        PeftModel.from_pretrained(tiny_llama(), str(directory))
    loaded = PeftModel.from_pretrained(tiny_llama(), str(directory), allow_pickle=True)
    torch.testing.assert_close(loaded(input_ids=IDS).logits, model(input_ids=IDS).logits)


def test_adapter_for_another_base_model_names_module_and_shapes(saved):
    _, directory = saved
    bigger = tiny_llama(hidden_size=64, intermediate_size=128)
    before = [type(m) for m in bigger.modules()]
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj.lora_A.weight' has shape \(4, 32\) "
                                         r"in the file but \(4, 64\)"):
        PeftModel.from_pretrained(bigger, str(directory))
    assert [type(m) for m in bigger.modules()] == before  # the caller's model is given back unwrapped


def test_adapter_for_another_architecture(saved):
    _, directory = saved
    with pytest.raises(ValueError, match="matched no module of GPT2LMHeadModel"):
        PeftModel.from_pretrained(tiny_gpt2(), str(directory))


def test_extra_or_missing_tensors_in_file(saved):
    _, directory = saved
    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    save_file({**tensors, "base_model.model.model.layers.9.mlp.lora_A.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="weights for 'model.layers.9.mlp.lora_A.weight'.*different base model"):
        PeftModel.from_pretrained(tiny_llama(), str(directory))
    tensors.pop("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight")
    save_file(tensors, path)
    with pytest.raises(ValueError, match="lacks weights for 'model.layers.1.self_attn.v_proj.lora_B.weight'"):
        PeftModel.from_pretrained(tiny_llama(), str(directory))


def test_save_into_a_file_path_is_refused(saved, tmp_path):
    model, _ = saved
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        model.save_pretrained(str(tmp_path / "f"))
