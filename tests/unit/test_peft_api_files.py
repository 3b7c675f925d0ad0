"""PEFT's loading and saving options: from_pretrained / load_adapter keyword arguments and results,
save_embedding_layers, ignore_mismatched_sizes, safetensors only, the README model card, and PEFT's helper
functions (state dicts, injection without a PeftModel, hot-swapping)."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lorakit import (
    LoraConfig,
    PeftModel,
    get_layer_status,
    get_model_status,
    get_peft_model,
    get_peft_model_state_dict,
    hotswap_adapter,
    inject_adapter_in_model,
    load_peft_weights,
    set_peft_model_state_dict,
)
from tests.tiny import tiny_llama


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin0, self.drop, self.lin1 = nn.Linear(6, 8), nn.Dropout(0.5), nn.Linear(8, 2)

    def forward(self, x):
        return self.lin1(self.drop(torch.relu(self.lin0(x))))


X = torch.randn(4, 6)


def saved(tmp_path, r=4, seed=1, **kw):
    torch.manual_seed(seed)
    model = get_peft_model(MLP(), LoraConfig(target_modules=["lin0"], r=r, init_lora_weights=False, **kw))
    model.save_pretrained(str(tmp_path))
    return model


def test_from_pretrained_leaves_the_model_in_eval_mode_unless_trainable(tmp_path):
    saved(tmp_path, lora_dropout=0.3)
    loaded = PeftModel.from_pretrained(MLP().train(), str(tmp_path))
    assert not loaded.training and not any(m.training for m in loaded.modules())
    assert torch.equal(loaded(X), loaded(X))
    trainable = PeftModel.from_pretrained(MLP().train(), str(tmp_path), is_trainable=True)
    assert trainable.training


def test_from_pretrained_uses_the_given_config_object(tmp_path):
    saved(tmp_path)
    config = LoraConfig.from_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(MLP(), str(tmp_path), config=config)
    assert loaded.peft_config["default"] is config and config.inference_mode is True
    with pytest.raises(ValueError, match="must be a PeftConfig"):
        PeftModel.from_pretrained(MLP(), str(tmp_path), config={"r": 4})


def test_load_adapter_returns_the_load_result(tmp_path):
    saved(tmp_path)
    model = get_peft_model(MLP(), LoraConfig(target_modules=["lin0"], r=4))
    result = model.load_adapter(str(tmp_path), "other")
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert not model.training and "other" in model.peft_config


def test_peft_loading_options_that_lorakit_lacks_are_refused(tmp_path):
    saved(tmp_path)
    with pytest.raises(ValueError, match="ephemeral_gpu_offload"):
        PeftModel.from_pretrained(MLP(), str(tmp_path), ephemeral_gpu_offload=True)
    with pytest.raises(ValueError, match="key_mapping"):
        PeftModel.from_pretrained(MLP(), str(tmp_path), key_mapping={"a": "b"})
    with pytest.raises(TypeError, match="unexpected keyword arguments"):
        PeftModel.from_pretrained(MLP(), str(tmp_path), frobnicate=True)


def test_safetensors_only(tmp_path):
    model = saved(tmp_path)
    with pytest.raises(ValueError, match="lorakit writes adapter weights as safetensors only"):
        model.save_pretrained(str(tmp_path / "pickle"), safe_serialization=False)
    assert not (tmp_path / "pickle").exists()


def test_ignore_mismatched_sizes(tmp_path):
    saved(tmp_path, r=4)
    with pytest.raises(ValueError, match="has shape"):
        PeftModel.from_pretrained(MLP(), str(tmp_path), config=LoraConfig(target_modules=["lin0"], r=2))
    with pytest.warns(UserWarning, match="being ignored because you passed `ignore_mismatched_sizes=True`"):
        model = PeftModel.from_pretrained(MLP(), str(tmp_path), config=LoraConfig(target_modules=["lin0"], r=2),
                                          ignore_mismatched_sizes=True)
    assert model.base_model.model.lin0.lora_A["default"].weight.shape == (2, 6)


def test_readme_model_card(tmp_path):
    saved(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\n") and "LoRA" in card
    (tmp_path / "README.md").write_text("mine")
    saved(tmp_path)
    kept = (tmp_path / "README.md").read_text()  # the user's text stays; only PEFT's metadata is added
    assert kept.endswith("mine") and "library_name: peft" in kept


def test_save_embedding_layers(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["embed_tokens", "q_proj"]))
    with pytest.warns(UserWarning, match="Setting `save_embedding_layers` to `True`"):
        model.save_pretrained(str(tmp_path / "auto"))
    keys = load_file(str(tmp_path / "auto" / "adapter_model.safetensors"))
    assert "base_model.model.model.embed_tokens.base_layer.weight" in keys
    model.save_pretrained(str(tmp_path / "off"), save_embedding_layers=False)
    assert not any("base_layer" in k for k in load_file(str(tmp_path / "off" / "adapter_model.safetensors")))
    plain = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    plain.save_pretrained(str(tmp_path / "on"), save_embedding_layers=True)
    keys = load_file(str(tmp_path / "on" / "adapter_model.safetensors"))
    assert {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"} <= set(keys)
    again = PeftModel.from_pretrained(tiny_llama(seed=3), str(tmp_path / "on"))
    assert torch.equal(again.get_base_model().model.embed_tokens.weight, plain.get_base_model().model.embed_tokens.weight)
    with pytest.raises(ValueError, match="save_embedding_layers"):
        plain.save_pretrained(str(tmp_path / "bad"), save_embedding_layers="yes")


def test_state_dict_helpers_round_trip(tmp_path):
    model = saved(tmp_path)
    tensors = get_peft_model_state_dict(model)
    assert set(tensors) == {"base_model.model.lin0.lora_A.weight", "base_model.model.lin0.lora_B.weight"}
    other = get_peft_model(MLP(), LoraConfig(target_modules=["lin0"], r=4))
    result = set_peft_model_state_dict(other, tensors)
    assert result.missing_keys == [] and torch.allclose(other.eval()(X), model.eval()(X))
    from_state = get_peft_model_state_dict(model, state_dict={k: v + 1 for k, v in model.state_dict().items()})
    assert torch.equal(from_state["base_model.model.lin0.lora_A.weight"], tensors["base_model.model.lin0.lora_A.weight"] + 1)
    assert set(load_peft_weights(str(tmp_path))) == set(tensors)


def test_inject_adapter_in_model_without_a_peft_model():
    model = inject_adapter_in_model(LoraConfig(target_modules=["lin1"], init_lora_weights=False), MLP())
    assert isinstance(model, MLP) and set(model.peft_config) == {"default"}
    tensors = get_peft_model_state_dict(model)
    assert set(tensors) == {"lin1.lora_A.weight", "lin1.lora_B.weight"}
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    fresh = inject_adapter_in_model(LoraConfig(target_modules=["lin0"]), MLP(), state_dict=tensors)
    set_peft_model_state_dict(fresh, tensors)
    assert torch.allclose(fresh.eval()(X), model.eval()(X))
    assert [s.name for s in get_layer_status(fresh)] == ["lin1"]
    assert get_model_status(fresh).base_model_type == "other"


def test_hotswap_adapter(tmp_path):
    first = saved(tmp_path / "one", seed=1)
    second = saved(tmp_path / "two", seed=2, lora_alpha=16)
    model = PeftModel.from_pretrained(MLP(), str(tmp_path / "one"))
    tensor = model.base_model.model.lin0.lora_A["default"].weight
    hotswap_adapter(model, str(tmp_path / "two"), adapter_name="default")
    assert model.base_model.model.lin0.lora_A["default"].weight is tensor
    assert torch.allclose(model(X), second.eval()(X)) and not torch.allclose(model(X), first.eval()(X))
    saved(tmp_path / "dora", use_dora=True)
    with pytest.raises(ValueError, match="Configs are incompatible: for use_dora"):
        hotswap_adapter(model, str(tmp_path / "dora"), adapter_name="default")
    assert json.loads(open(os.path.join(tmp_path, "two", "adapter_config.json")).read())["lora_alpha"] == 16


def test_base_model_state_dict_has_the_original_keys_and_loads_back():
    from lorakit import get_base_model_state_dict, set_base_model_state_dict
    plain = MLP()
    expected = {k: v.clone() for k, v in plain.state_dict().items()}
    model = get_peft_model(plain, LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"]))
    base = get_base_model_state_dict(model)
    assert set(base) == set(expected) and all(torch.equal(base[k], expected[k]) for k in expected)
    changed = {k: v + 1 for k, v in base.items()}
    result = set_base_model_state_dict(model, changed)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(model.base_model.model.lin0.base_layer.weight, expected["lin0.weight"] + 1)
    with pytest.raises(RuntimeError, match="missing keys"):
        set_base_model_state_dict(model, {"lin0.weight": expected["lin0.weight"]})


def test_rslora_with_patterns_and_pissa_warns_when_built():
    with pytest.warns(UserWarning, match="Rank-Stabilized LoRA"):
        LoraConfig(target_modules=["lin0"], use_rslora=True, rank_pattern={"lin0": 2}, init_lora_weights="pissa")


def test_compiled_hotswap_preparation_pads_ranks_and_keeps_tensors(tmp_path):
    from lorakit import prepare_model_for_compiled_hotswap
    saved(tmp_path / "small", r=2, seed=1)
    large = saved(tmp_path / "large", r=6, seed=2, lora_alpha=12)
    model = PeftModel.from_pretrained(MLP(), str(tmp_path / "small"))
    before = model(X)
    prepare_model_for_compiled_hotswap(model, target_rank=6, config=model.peft_config)
    layer = model.base_model.model.lin0
    assert layer.lora_A["default"].weight.shape == (6, 6) and layer.lora_B["default"].weight.shape == (8, 6)
    assert isinstance(layer.scaling["default"], torch.Tensor) and model.peft_config["default"].r == 6
    assert torch.allclose(model(X), before, atol=1e-6)  # zero padding changes nothing
    tensors = (layer.lora_A["default"].weight, layer.scaling["default"])
    hotswap_adapter(model, str(tmp_path / "large"), adapter_name="default")
    assert layer.lora_A["default"].weight is tensors[0] and layer.scaling["default"] is tensors[1]
    assert torch.allclose(model(X), large.eval()(X), atol=1e-6)
    hotswap_adapter(model, str(tmp_path / "small"), adapter_name="default")  # a smaller rank: zero-padded in
    assert torch.allclose(model(X), before, atol=1e-6)
    with pytest.raises(ValueError, match="original rank is larger"):
        prepare_model_for_compiled_hotswap(model, target_rank=4)
    with pytest.raises(ValueError, match="No adapter layers found"):
        prepare_model_for_compiled_hotswap(MLP())


def test_save_embedding_layers_on_a_plain_module_warns_and_saves_without_them(tmp_path):
    class WithEmbedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.lin0 = nn.Embedding(10, 6), nn.Linear(6, 2)

    model = get_peft_model(WithEmbedding(), LoraConfig(target_modules=["emb", "lin0"]))
    with pytest.warns(UserWarning, match="not a 🤗 transformers model"):
        model.save_pretrained(str(tmp_path), save_embedding_layers=True)
    assert not any("base_layer" in k for k in load_file(str(tmp_path / "adapter_model.safetensors")))


def test_a_size_mismatch_is_a_value_and_a_runtime_error(tmp_path):
    saved(tmp_path, r=4)
    config = LoraConfig(target_modules=["lin0"], r=2)
    model = get_peft_model(MLP(), config)
    for error in (ValueError, RuntimeError):
        with pytest.raises(error, match="size mismatch"):
            model.load_adapter(str(tmp_path), adapter_name="default")
